"""The step-throughput benchmark runs end to end on CPU, times the model's own stage methods, fits
its defaults to the device, and its token agreement check holds up."""

import json
import time

import pytest
import torch

from benchmarks.step_throughput import (
    STAGES,
    StageTimer,
    Trainee,
    cim_config,
    main,
    make_batch,
    parse_args,
    smooth_images,
    staged_step,
    token_agreement,
)
from cim_models import CIMForPreTraining
from cim_models.tokenizers import DallETokenizer
from tests.tiny import TINY_DALL_E

TINY_RUN = [
    "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "1",
    "--breakdown-steps", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_step():
    args = parse_args(["--preset", "tiny", "--device", "cpu", "--precision", "fp32"])
    torch.manual_seed(0)
    model = CIMForPreTraining(cim_config(args)).train()
    batch = make_batch(model, 2, "cpu", channels_last=False)
    inputs = {k: batch[k] for k in ("pixel_values", "tokenizer_pixel_values", "bool_masked_pos")}
    return model, Trainee(model, args, torch.device("cpu")), inputs


class Recorder:
    """A stage callback that records the names it is entered with, in order."""

    def __init__(self):
        self.names = []

    def __call__(self, name):
        self.names.append(name)
        return torch.enable_grad()  # any context manager


def test_step_benchmark_writes_every_number_as_json(tmp_path):
    out = tmp_path / "step.json"
    report = main([*TINY_RUN, "--precision", "fp32", "--check-tokens", "8", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["ratio"] == report["ratio"] > 0
    for name in ("supervised", "cim"):
        for key in ("step_ms", "images_per_s", "gflop_per_image", "tflop_per_s", "peak_memory_gib"):
            assert written[name][key] > 0, (name, key)
    assert set(written["cim"]["stages_ms"]) == set(STAGES)
    assert all(ms > 0 for ms in written["cim"]["stages_ms"].values())
    parts = {part for stage_parts in STAGES.values() for part in stage_parts}
    assert set(written["cim"]["parts_ms"]) == parts
    assert written["cim"]["stages_sum_ms"] > 0 and written["cim"]["instrumented_step_ms"] > 0
    # The CIM step does strictly more work than the supervised step of its enhancer.
    assert written["cim"]["gflop_per_image"] > written["supervised"]["gflop_per_image"]
    assert written["config"]["batch_size"] == 2 and written["hardware"]["device"] == "cpu"
    # On CPU the tokenizer runs in fp32: the step's tokens are the fp32 ones.
    assert written["config"]["tokenizer_precision"] == "fp32"
    assert written["token_agreement"] == 1.0


def test_defaults_fit_the_device():
    cpu = parse_args(["--device", "cpu"])
    assert (cpu.preset, cpu.precision, cpu.batch_size, cpu.steps) == ("tiny", "fp32", 16, 10)
    assert (
        cpu.breakdown_steps == 5
        and parse_args(["--device", "cpu", "--steps", "3"]).breakdown_steps == 3
    )
    gpu = parse_args(["--device", "cuda"])
    assert (gpu.preset, gpu.precision, gpu.batch_size, gpu.steps) == ("vit_base", "bf16", 128, 30)
    flags = parse_args(["--device", "cuda", "--preset", "resnet50", "--batch-size", "64"])
    assert (flags.preset, flags.batch_size, flags.precision) == ("resnet50", 64, "bf16")


def test_breakdown_runs_the_models_own_forward_stage_by_stage(tiny_step):
    model, trainee, inputs = tiny_step
    recorder = Recorder()
    torch.manual_seed(1)
    staged_step(model, trainee, inputs, recorder, optimizer=False)
    staged = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert recorder.names == [
        "tokenize", "generate", "generator_loss", "sample", "corrupt", "enhance", "enhancer_loss",
        "generator_backward", "enhancer_backward",
    ]  # fmt: skip
    assert not {"tokenize", "corrupt"} & set(vars(model))  # the class's methods are back
    # Separate backwards of the two losses give the gradients of the Trainer's single backward.
    torch.manual_seed(1)
    model(**inputs).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert staged.keys() == plain.keys()
    assert any(n.startswith("generator.") for n in plain) and any(
        n.startswith("enhancer.") for n in plain
    )
    for name, grad in plain.items():
        torch.testing.assert_close(staged[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_breakdown_times_a_changed_stage_method_without_editing_the_benchmark(
    tiny_step, monkeypatch
):
    model, trainee, inputs = tiny_step
    slow = CIMForPreTraining.corrupt

    def corrupt(self, corrupted_ids):
        time.sleep(0.2)
        return slow(self, corrupted_ids)

    monkeypatch.setattr(CIMForPreTraining, "corrupt", corrupt)
    timer = StageTimer(torch.device("cpu"))
    timer.new_step()
    staged_step(model, trainee, inputs, timer)
    assert timer.median_ms(("corrupt",)) >= 200  # the new code is timed, in its own stage
    assert timer.median_ms(STAGES["sample_decode"]) >= 200


def test_low_precision_encoders_give_the_fp32_tokens_on_smooth_images():
    # >= 99 % of positions. The tiny random dVAE runs the real code path; its logits are not a
    # trained model's, so this pins the property, not the real tokenizer's margin.
    tokenizer = DallETokenizer(**TINY_DALL_E)
    images = smooth_images(32, 64)
    assert tokenizer.encode(images).unique().numel() > 1  # a constant tokenizer agrees trivially
    assert token_agreement(tokenizer, images) == 1.0  # as the step runs it: fp32 on CPU
    assert token_agreement(tokenizer, images, torch.bfloat16) >= 0.99
    # fp16, what the tokenizer runs on GPUs; fp16 convolutions are slow on most CPUs.
    assert token_agreement(tokenizer, images[:16], torch.float16) >= 0.99
