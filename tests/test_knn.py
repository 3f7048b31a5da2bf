import torch
import torch.nn.functional as F

from cim_models.evaluation.knn import knn_accuracy, knn_predict


def _clusters(n, num_classes=10, dim=32, noise=0.3, seed=0):
    rng = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(0, num_classes, (n,), generator=rng)
    features = centres[labels] + noise * torch.randn(n, dim, generator=rng)
    return F.normalize(features, dim=1), labels


def test_knn_on_features_that_encode_the_label_is_near_perfect():
    bank, bank_labels = _clusters(500, seed=0)
    queries, query_labels = _clusters(200, seed=1)
    assert knn_accuracy(bank, bank_labels, queries, query_labels)[1] > 0.97


def test_knn_on_random_features_is_near_chance():
    torch.manual_seed(0)
    bank_labels = torch.randint(0, 10, (1000,))
    query_labels = torch.randint(0, 10, (1000,))
    bank = F.normalize(torch.randn(1000, 32), dim=1)
    queries = F.normalize(torch.randn(1000, 32), dim=1)
    assert abs(knn_accuracy(bank, bank_labels, queries, query_labels)[1] - 0.1) < 0.04


def test_knn_matches_brute_force_reference_and_batching():
    bank, bank_labels = _clusters(300, noise=1.5, seed=2)
    queries, _ = _clusters(50, noise=1.5, seed=3)
    similarity = queries @ bank.T
    reference = torch.zeros(50, 10)
    for q in range(50):
        order = similarity[q].argsort(descending=True)[:20]
        for i in order:
            reference[q, bank_labels[i]] += torch.exp(similarity[q, i] / 0.07)
    torch.testing.assert_close(
        knn_predict(bank, bank_labels, queries, k=20, batch_size=7), reference, rtol=1e-4, atol=1e-4
    )
