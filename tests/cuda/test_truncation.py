"""The truncation kernels against the reference backend's sort and selection.

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
from neuron_llm.backends.truncation import select_top_k_top_p, sort_top_k_top_p


def reference(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return TorchBackend().top_k_top_p(logits, None, p)


def assert_top_p_set(logits: torch.Tensor, out: torch.Tensor, p: torch.Tensor) -> None:
    """Each row keeps a set of most likely tokens holding at least top_p of the mass, which
    falls under top_p without its least likely tokens (all tied at the least probability; fp32
    logits of a large vocabulary hold ties), in fp64 within fp32 rounding."""
    for row, row_p in enumerate(p.tolist()):
        probs = logits[row].double().softmax(dim=-1)
        kept = ~out[row].isinf()
        least_kept = probs[kept].min()
        assert torch.equal(kept, probs >= least_kept), f"row {row} keeps a token less likely than one it drops"
        mass = probs[kept].sum().item()
        assert mass >= row_p - 1e-5, f"row {row} keeps {mass} < top_p {row_p}"
        least_mass = probs[probs == least_kept].sum().item()
        assert mass - least_mass < row_p + 1e-5, f"row {row} keeps more than top_p {row_p} needs"


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


def test_rejects_per_row_values_that_are_not_one_contiguous_value_a_row(device: torch.device) -> None:
    """The kernels read row r's value at offset r: a strided column would give rows others' values."""
    logits = torch.zeros(4, 10, device=device)
    pairs = torch.ones(4, 2, device=device)
    with pytest.raises(ValueError, match=r"top_p must be a contiguous \[4\] tensor"):
        top_p(logits, pairs[:, 0])
    with pytest.raises(ValueError, match=r"top_p must be a contiguous \[4\] tensor"):
        top_p(logits, pairs[:3, 0].contiguous())
    k = torch.ones(4, 2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=r"top_k must be a contiguous \[4\] tensor"):
        truncation.top_k_top_p(logits, k[:, 1], None, bound=2)
    with pytest.raises(ValueError, match=r"top_p must be a contiguous \[4\] tensor"):
        truncation.top_k_top_p(logits, k[:, 1].contiguous(), pairs[:, 1], bound=2)


def test_top_k_kernel_matches_the_selection(device: torch.device) -> None:
    # Two blocks of vocabulary with a partial last one. Rows: top-k 1, 7 and 50 with top-p or
    # without, a row keeping every token (top-k past the bound, top-p 1), a tiny top-p, and two
    # rows of ties: 60 logits tied second, past the bound of 50, where the top token holds
    # e / (e + 60) = 0.043 of top-k 2's survivors: top-p 0.04 keeps it alone, 0.05 all 61.
    generator = torch.Generator().manual_seed(4)
    vocab = BLOCK + 904
    logits = 3 * torch.randn(8, vocab, generator=generator)
    logits[6:] = 0.0
    logits[6:, 0], logits[6:, 1:61] = 5.0, 4.0
    logits[2, :5] = float("-inf")
    k = torch.tensor([1, 7, 50, 50, vocab, 30, 2, 2])
    p = torch.tensor([0.9, 0.5, 1.0, 1e-6, 1.0, 0.95, 0.04, 0.05])
    logits, k, p = logits.to(device), k.to(device), p.to(device)
    for top_p_or_none in (p, None):
        out = truncation.top_k_top_p(logits, k, top_p_or_none, bound=50)
        assert torch.equal(out, select_top_k_top_p(logits, k, top_p_or_none, bound=50))
    assert torch.equal(out, TorchBackend().top_k_top_p(logits, k, None))  # top-k alone: the sort's
    assert (~out[6].isinf()).sum() == 61 and torch.equal(out[4], logits[4])
    kept = ~truncation.top_k_top_p(logits, k, p, bound=50).isinf()
    assert kept[6].sum() == 1 and kept[7].sum() == 61 and kept[3].sum() == 1


def test_rejects_a_bound_past_the_selection_limit(device: torch.device) -> None:
    logits, k = torch.zeros(1, 2000, device=device), torch.ones(1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="bound=1025"):
        truncation.top_k_top_p(logits, k, None, bound=1025)


def test_the_backend_sends_truncations_here(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    # Top-p alone goes to its kernel from MIN_ROWS rows, top-k with a bound to the other (here
    # on any device); top-k without a bound sorts.
    monkeypatch.setattr(truncation, "takes", lambda logits: True)
    calls = []
    monkeypatch.setattr(truncation, "top_p", lambda logits, p: calls.append("top_p") or top_p(logits, p))
    top_k_top_p = truncation.top_k_top_p
    monkeypatch.setattr(truncation, "top_k_top_p", lambda *args: calls.append("top_k") or top_k_top_p(*args))
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(3)).to(device)
    p, k = torch.full((4,), 0.7, device=device), torch.full((4,), 20, device=device)
    assert torch.equal(CudaBackend().top_k_top_p(logits, None, p), reference(logits, p))
    CudaBackend().top_k_top_p(logits[:3], None, p[:3])
    assert calls == ["top_p"]
    expected = TorchBackend().top_k_top_p(logits, k, p)
    assert torch.equal(CudaBackend().top_k_top_p(logits, k, p), expected)
    assert calls == ["top_p"]
    assert torch.equal(CudaBackend().top_k_top_p(logits, k, p, 20), select_top_k_top_p(logits, k, p, 20))
    assert calls == ["top_p", "top_k"]


@pytest.mark.cuda
def test_llama3_vocabulary_on_gpu(device: torch.device) -> None:
    generator = torch.Generator(device).manual_seed(2)
    rows, vocab = 64, 128256
    logits = 4 * torch.randn(rows, vocab, device=device, generator=generator)
    p = torch.rand(rows, device=device, generator=generator) * 0.9 + 0.05
    p[1::4] = 1.0
    assert_top_p_set(logits.cpu(), top_p(logits, p).cpu(), p.cpu())


@pytest.mark.cuda
def test_top_k_selection_on_gpu(device: torch.device) -> None:
    # The selection (the reference's and the kernel's) on the GPU: top-k 50 (exact: the same
    # mask as the sort), then top-p over the 50 survivors, checked as a top-p set of their
    # distribution.
    generator = torch.Generator(device).manual_seed(3)
    rows, vocab = 64, 128256
    logits = 4 * torch.randn(rows, vocab, device=device, generator=generator)
    k = torch.full((rows,), 50, device=device)
    p = torch.rand(rows, device=device, generator=generator) * 0.9 + 0.05
    p[1::4] = 1.0
    out = select_top_k_top_p(logits, k, p, bound=50)
    survivors = sort_top_k_top_p(logits, k, None)
    assert torch.equal(select_top_k_top_p(logits, k, None, bound=50), survivors)
    assert torch.equal(truncation.top_k_top_p(logits, k, None, bound=50), survivors)
    assert_top_p_set(survivors.cpu(), out.cpu(), p.cpu())
    assert_top_p_set(survivors.cpu(), truncation.top_k_top_p(logits, k, p, bound=50).cpu(), p.cpu())
