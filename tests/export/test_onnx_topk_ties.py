"""The exported TopK SAE activation breaks ties toward the lower latent, as `reference.sae_encode`
(DESIGN.md 3: every backend matches the reference): ONNX TopK run by onnxruntime, on
pre-activations with many exact ties (positive, so the chosen latents are visible after ReLU)."""
from __future__ import annotations

import warnings

import pytest
import torch

from headsteer.export.onnx_model import sae_encode_topk
from headsteer.kernels import reference


class _TopK(torch.nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, pre):
        return sae_encode_topk(pre, self.k)


@pytest.mark.parametrize("k", [1, 5])
def test_onnx_topk_ties_go_to_the_lower_latent(k, tmp_path):
    import onnxruntime as ort

    width = 12
    pre = torch.randint(1, 4, (6, width)).float()  # values 1..3 over 12 latents: ties everywhere
    pre[0] = 2.0  # one row entirely tied
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_TopK(k), (pre,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(tmp_path / "topk.onnx"))
    session = ort.InferenceSession(str(tmp_path / "topk.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: pre.numpy()})[0])
    eye = torch.eye(width)
    want = reference.sae_encode(pre, eye, torch.zeros(width), torch.zeros(width), "topk", k=k)
    assert torch.equal(got, want)
    assert torch.equal(got[0] != 0, torch.arange(width) < k)
