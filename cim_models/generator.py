"""The CIM generator: a small BEiT that predicts the visual tokens of masked patches, and the
sampler that turns its predictions into a corrupted token grid."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn
from torch.utils.checkpoint import checkpoint


class CIMGenerator(Beit):
    """BEiT blocks with a shared relative position bias and layer scale, a learned ``[MASK]``
    embedding and a linear head to ``vocab_size`` token logits.

    The ``[MASK]`` embedding replaces the patch embedding of each masked patch before any block
    runs, so nothing of a masked patch's content reaches the logits.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 4,
        num_heads: int = 12,
        vocab_size: int = 8192,
        init_values: float = 0.1,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            init_values=init_values,
            use_abs_pos_emb=False,
            use_shared_rel_pos_bias=True,
            drop_path_rate=drop_path_rate,
        )
        self.vocab_size = vocab_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        masked_index: torch.Tensor,
    ) -> torch.Tensor:
        """Token logits at the masked positions only, (B, M, vocab_size).

        ``pixel_values``: (B, 3, H, W); ``bool_masked_pos``: (B, N) with N = number of patches;
        ``masked_index``: (B, M), the masked positions from
        :func:`~cim_models.masking.masked_indices`, so every shape is static. The head runs only
        where a loss and a sample are needed, which saves most of its vocab_size-way matmul.
        """
        x = self.patch_embed(pixel_values)  # (B, N, D)
        x = torch.where(bool_masked_pos.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias()
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        x = x[:, 1:]  # (B, N, D)
        x = x.gather(1, masked_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, M, D)
        return self.lm_head(self.norm(x))  # (B, M, V)


def sample_tokens(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    masked_index: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The corrupted token grid: masked positions draw from softmax(logits / temperature), the
    others keep their original ids.

    ``logits``: (B, M, V) as :class:`CIMGenerator` returns them for ``masked_index`` (B, M);
    ``input_ids``: (B, h, w) or (B, N); returns the same shape and dtype as ``input_ids``. Every
    position of every sample draws independently; ``temperature <= 0`` takes the argmax.
    Gumbel-max sampling needs no host synchronisation and draws from torch's RNG, which Trainer
    checkpoints save.
    """
    if logits.shape[:2] != masked_index.shape:
        raise ValueError(
            f"logits must be (B, M, V) for a masked_index of shape (B, M) = "
            f"{tuple(masked_index.shape)}, got {tuple(logits.shape)}; pass the generator's logits "
            "at the masked positions."
        )
    with torch.no_grad():
        scores = logits.detach().float()  # (B, M, V)
        if temperature > 0:
            gumbel = -torch.empty_like(scores).exponential_().log()
            scores = scores / temperature + gumbel
        sampled = scores.argmax(-1).to(input_ids.dtype)  # (B, M)
        corrupted = input_ids.flatten(1).scatter(1, masked_index, sampled)  # (B, N)
    return corrupted.view_as(input_ids)
