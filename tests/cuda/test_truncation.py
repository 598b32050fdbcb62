"""The top-p truncation kernel against the sort of the reference backend.

On the CPU it runs in Triton's interpreter on small vocabularies; the test marked ``cuda``
runs Llama 3's vocabulary and a decode batch's rows on a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from neuron_llm.backends.cuda import truncation
from neuron_llm.backends.cuda.backend import CudaBackend
from neuron_llm.backends.cuda.truncation import BLOCK, top_p
from neuron_llm.backends.torch_backend import TorchBackend


def reference(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return TorchBackend().top_k_top_p(logits, None, p)


def assert_top_p_set(logits: torch.Tensor, out: torch.Tensor, p: torch.Tensor) -> None:
    """Each row keeps a set of most likely tokens holding at least top_p of the mass, which
    falls under top_p without its least likely token (in fp64, within fp32 rounding)."""
    for row, row_p in enumerate(p.tolist()):
        probs = logits[row].double().softmax(dim=-1)
        kept = ~out[row].isinf()
        least_kept = probs[kept].min()
        assert torch.equal(kept, probs >= least_kept), f"row {row} keeps a token less likely than one it drops"
        mass = probs[kept].sum().item()
        assert mass >= row_p - 1e-5, f"row {row} keeps {mass} < top_p {row_p}"
        assert mass - least_kept.item() < row_p + 1e-5, f"row {row} keeps more than top_p {row_p} needs"


def test_matches_the_sort(device: torch.device) -> None:
    # A vocabulary over two blocks with a partial last one; negative and positive logits, a
    # few -inf (min_tokens); rows without top-p, a tiny top-p (the top token alone), and 0.99.
    generator = torch.Generator().manual_seed(0)
    vocab = BLOCK + 904
    logits = (3 * torch.randn(5, vocab, generator=generator)).to(device)
    logits[0, :7] = float("-inf")
    p = torch.tensor([0.9, 1.0, 0.5, 1e-6, 0.99], device=device)
    out = top_p(logits, p)
    assert torch.equal(out, reference(logits, p))
    assert (~out[3].isinf()).sum() == 1
    assert torch.equal(out[1], logits[1])


def test_strided_rows_and_peaked_rows(device: torch.device) -> None:
    # Rows of a wider tensor (a stride past the vocabulary); one nearly one-hot row, where a
    # single token holds more than top_p, and one flat row, where most tokens are needed.
    generator = torch.Generator().manual_seed(1)
    wide = torch.randn(4, 3000, generator=generator).to(device)
    logits = wide[:, :2500]
    logits[1] = logits[1] * 0.01
    logits[2, 17] = 40.0
    p = torch.tensor([0.8, 0.95, 0.9, 0.05], device=device)
    out = top_p(logits, p)
    assert (~out[2].isinf()).sum() == 1
    assert (~out[1].isinf()).sum() > 2000
    assert_top_p_set(logits.cpu(), out.cpu(), p.cpu())


def test_ties_at_the_threshold_are_kept(device: torch.device) -> None:
    # The reference keeps or drops tied tokens in its sort's order; the kernel keeps them all.
    logits = torch.zeros(1, 300, device=device)
    logits[0, :10] = 5.0
    out = top_p(logits, torch.tensor([0.5], device=device))
    assert torch.equal(~out[0].isinf(), logits[0] == 5.0)  # the ten hold 0.84 of the mass


def test_rejects_other_logits(device: torch.device) -> None:
    with pytest.raises(ValueError, match="fp32 logits"):
        top_p(torch.zeros(4, 10, dtype=torch.float16, device=device), torch.ones(4, device=device))


def test_the_backend_sends_top_p_alone_here(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    # Top-p alone goes to the kernel (here on any device); with top-k, the sort takes both.
    monkeypatch.setattr(truncation, "takes", lambda logits: True)
    calls = []
    monkeypatch.setattr(truncation, "top_p", lambda logits, p: calls.append(p) or top_p(logits, p))
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(3)).to(device)
    p, k = torch.full((4,), 0.7, device=device), torch.full((4,), 20, device=device)
    assert torch.equal(CudaBackend().top_k_top_p(logits, None, p), reference(logits, p))
    assert len(calls) == 1
    expected = TorchBackend().top_k_top_p(logits, k, p)
    assert torch.equal(CudaBackend().top_k_top_p(logits, k, p), expected)
    assert len(calls) == 1


@pytest.mark.cuda
def test_llama3_vocabulary_on_gpu(device: torch.device) -> None:
    generator = torch.Generator(device).manual_seed(2)
    rows, vocab = 64, 128256
    logits = 4 * torch.randn(rows, vocab, device=device, generator=generator)
    p = torch.rand(rows, device=device, generator=generator) * 0.9 + 0.05
    p[1::4] = 1.0
    assert_top_p_set(logits.cpu(), top_p(logits, p).cpu(), p.cpu())
