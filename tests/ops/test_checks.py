"""Input checks name the offending argument."""

import pytest
import torch

from geolinrpe.features import ELUFeatures, build_feature_map
from geolinrpe.ops import MaskMode, linear_attention
from geolinrpe.ops.checks import check_batch, check_same_device_dtype


def test_device_and_dtype_mismatch_name_the_argument():
    cpu = torch.zeros(3)
    with pytest.raises(ValueError, match="pos is on meta but q is on cpu"):
        check_same_device_dtype({"q": cpu, "pos": torch.zeros(3, device="meta")})
    with pytest.raises(ValueError, match="v has dtype torch.float64 but q has dtype torch.float32"):
        check_same_device_dtype({"q": cpu, "v": cpu.double()})
    check_same_device_dtype({"q": cpu, "pos": cpu.double()}, same_dtype=False)


def test_batch_checks():
    assert check_batch(torch.tensor([0, 0, 1, 2, 2]), 5, torch.device("cpu")) == 3
    with pytest.raises(ValueError, match="empty"):
        check_batch(torch.zeros(0, dtype=torch.long), 0, torch.device("cpu"))
    assert check_batch(torch.zeros(0, dtype=torch.long), 0, torch.device("cpu"), True) == 0
    with pytest.raises(ValueError, match="integer"):  # types and shapes are checked when empty
        check_batch(torch.zeros(0), 0, torch.device("cpu"), allow_empty=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["favor+", "relu"])
def test_operator_returns_empty_outputs_for_empty_batches(causal, kernel):
    feat = MaskMode(build_feature_map(kernel, 4, 8))
    for lead, extra in [
        ((0, 5), {}),
        ((0, 5), {"key_padding_mask": torch.zeros(0, 5, dtype=torch.bool)}),
        ((2, 0), {}),
        ((0,), {"batch": torch.zeros(0, dtype=torch.long)}),
    ]:
        q, v = torch.randn(*lead, 3, 4), torch.randn(*lead, 3, 2)
        out = linear_attention(q, q, v, featurizer=feat, causal=causal, **extra)
        assert out.shape == v.shape and out.dtype == v.dtype
    with pytest.raises(ValueError, match="k has leading shape"):
        linear_attention(q, torch.randn(1, 3, 4), v, featurizer=feat, **extra)


def test_operator_rejects_bad_arguments():
    feat = MaskMode(ELUFeatures(4))
    q = torch.randn(2, 5, 3, 4)
    v = torch.randn(2, 5, 3, 2)
    cases = [
        (dict(q=q, k=q, v=v, normalize="softmax"), "normalize"),
        (dict(q=q, k=q, v=v, chunk_size=0), "chunk_size"),
        (dict(q=q, k=q[:, :4], v=v), "k has leading shape"),
        (dict(q=q, k=q[..., :3], v=v), "last dim"),
        (dict(q=q[0], k=q[0], v=v[0]), r"\[b, n, h, d\]"),
        (dict(q=q, k=q, v=v, batch=torch.zeros(2, dtype=torch.long)), r"\[n, h, d\]"),
        (dict(q=q, k=q, v=v.double()), "dtype"),
        (dict(q=q, k=q, v=v * float("nan")), "v contains"),
        (dict(q=q, k=q, v=v, pos=torch.randn(2, 4, 3)), "pos must have shape"),
        (dict(q=q, k=q, v=v, pos=torch.randn(2, 5, 3).double()), "dtype"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            linear_attention(featurizer=feat, **kwargs)
