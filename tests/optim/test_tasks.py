"""The learned-optimizer task suite: families, variants, splits, generated text, QM9."""

from __future__ import annotations

import pytest
import torch

from geolinrpe.optim.tasks import (
    CHARLM_CHARS,
    CHARLM_VOCAB,
    FAMILIES,
    HELD_OUT,
    IN_DISTRIBUTION,
    OOD_WIDTHS,
    QM9_POOL,
    SPLIT_OFFSETS,
    TaskSpec,
    Variant,
    _digits,
    _qm9_pool,
    generate_text,
    make_task,
    ood_variant,
    split_tasks,
)

WIDTH = {
    "quadratic": "dim",
    "rosenbrock": "dim",
    "mlp": "hidden",
    "conv": "channels",
    "molecule": "hidden",
    "charlm": "width",
    "qm9": "width",
}
LAYERED = ("mlp", "conv", "molecule", "charlm", "qm9")


def _qm9_unavailable() -> str | None:
    try:
        _qm9_pool()
    except ImportError as err:  # the qm9 extra (qm9pack, torch_geometric, pandas) is missing
        return str(err)
    return None


def _family(family: str):
    if family != "qm9":
        return family
    reason = _qm9_unavailable()
    return pytest.param(family, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


ALL = [_family(f) for f in FAMILIES]


def _eval_loss(task, params, batches) -> float:
    with torch.no_grad():
        return sum(float(task.loss(params, b)) for b in batches) / len(batches)


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("variant", [IN_DISTRIBUTION, ood_variant(2)], ids=["id", "ood"])
def test_family_deterministic_finite_and_adam_lowers_loss(family: str, variant: Variant) -> None:
    torch.manual_seed(1234)  # global RNG state must not matter
    seed = 3 if variant == IN_DISTRIBUTION else 30_003
    task, again = make_task(family, seed, variant=variant), make_task(family, seed, variant=variant)
    torch.manual_seed(99)
    p1 = task.init(torch.Generator().manual_seed(0))
    p2 = again.init(torch.Generator().manual_seed(0))
    assert len(p1) == len(p2) and all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))
    b1 = task.sample(torch.Generator().manual_seed(5))
    b2 = again.sample(torch.Generator().manual_seed(5))
    l1, l2 = task.loss(p1, b1), again.loss(p2, b2)
    assert l1.dim() == 0 and torch.isfinite(l1) and torch.equal(l1, l2)

    gen = torch.Generator().manual_seed(0)
    params = [p.requires_grad_(True) for p in task.init(gen)]
    evalgen = torch.Generator().manual_seed(99)
    held = [task.sample(evalgen) for _ in range(4)]
    before = _eval_loss(task, params, held)
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(60):
        loss = task.loss(params, task.sample(gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _eval_loss(task, params, held)
    assert after < 0.99 * before, (family, before, after)  # conv, the slowest: 2.2% lower
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("family", ALL)
def test_ood_is_wider_deeper_and_longer(family: str) -> None:
    specs = split_tasks("ood", [family], 3)
    assert [s.variant.width_multiplier for s in specs] == list(OOD_WIDTHS)
    for spec in specs[:2]:  # x2 and x3 (x4 only costs time)
        assert spec.horizon_multiplier == 5 and spec.variant.extra_layers == 1
        ood = spec.build()
        base = make_task(family, spec.seed)  # the same seed in distribution
        assert ood.horizon_multiplier == 5 and base.horizon_multiplier == 1
        w = spec.variant.width_multiplier
        assert getattr(ood, WIDTH[family]) == w * getattr(base, WIDTH[family])
        gen = torch.Generator().manual_seed(0)
        n_ood, n_base = len(ood.init(gen)), len(base.init(gen))
        assert n_ood > n_base if family in LAYERED else n_ood == n_base
        batch = ood.sample(torch.Generator().manual_seed(1))
        assert torch.isfinite(ood.loss(ood.init(gen), batch))


def test_splits_do_not_overlap_and_carry_variants() -> None:
    families = ("quadratic", "mlp", "charlm")
    specs = {split: split_tasks(split, families, 30) for split in SPLIT_OFFSETS}
    seeds = [s.seed for split in specs.values() for s in split]
    assert len(seeds) == len(set(seeds)) == 120
    assert [s.family for s in specs["train"][:4]] == ["quadratic", "mlp", "charlm", "quadratic"]
    assert all(s.variant == IN_DISTRIBUTION for s in specs["train"] + specs["valid"])
    assert all(s.variant == HELD_OUT and s.horizon_multiplier == 1 for s in specs["test"])
    assert all(s.horizon_multiplier == 5 for s in specs["ood"])
    assert [s.variant.width_multiplier for s in specs["ood"][::3]][:4] == [2, 3, 4, 2]
    assert TaskSpec("mlp", 3) == TaskSpec("mlp", 3, IN_DISTRIBUTION)
    with pytest.raises(ValueError, match="split"):
        split_tasks("other", families, 1)
    with pytest.raises(ValueError, match="unknown task family"):
        split_tasks("train", ["nope"], 1)
    with pytest.raises(ValueError, match="width_multiplier"):
        Variant(width_multiplier=0)
    with pytest.raises(ValueError, match="data_scale"):
        Variant(data_scale=0.0)


def test_held_out_tasks_use_seed_dependent_data_subsets() -> None:
    num_images = _digits()[0].shape[0]
    for family in ("mlp", "conv"):
        assert make_task(family, 20_000).subset is None  # Variant(): all images, as before
        a, b = (make_task(family, s, variant=HELD_OUT) for s in (20_000, 20_001))
        assert len(a.subset) == len(b.subset) == round(0.5 * num_images)
        assert not torch.equal(a.subset, b.subset)
        assert torch.equal(a.subset, make_task(family, 20_000, variant=HELD_OUT).subset)
    x, _ = _digits()
    task = make_task("mlp", 20_000, variant=HELD_OUT)
    images, _ = task.sample(torch.Generator().manual_seed(0))
    allowed = x[task.subset].to(images.dtype)
    assert all((allowed == img).all(1).any() for img in images)

    train = [make_task("charlm", s) for s in (0, 1, 2)]
    held = make_task("charlm", 20_000, variant=HELD_OUT)
    assert {len(t.text) for t in train} == {CHARLM_CHARS // 4}
    assert len(held.text) == CHARLM_CHARS // 8
    assert len({t.text_offset for t in train + [held]}) == 4


@pytest.mark.skipif(_qm9_unavailable() is not None, reason=str(_qm9_unavailable()))
def test_qm9_pool_and_subsets() -> None:
    z, pos, pad, y = _qm9_pool()
    assert z.shape[0] == pos.shape[0] == y.shape[0] == QM9_POOL
    assert abs(float(y.mean())) < 1e-6 and abs(float(y.std()) - 1) < 1e-6
    assert bool((z[pad] == 0).all()) and bool((z[~pad] > 0).all())
    a, b = make_task("qm9", 0), make_task("qm9", 1)
    assert len(a.subset) == QM9_POOL // 2 and not torch.equal(a.subset, b.subset)
    assert len(make_task("qm9", 20_000, variant=HELD_OUT).subset) == QM9_POOL // 4
    assert a.num_layers == 1 and a.width == 32


def test_generated_text_is_deterministic_with_documented_size_and_vocabulary() -> None:
    text = generate_text()
    assert len(text) == CHARLM_CHARS == 200_000
    assert text == generate_text(CHARLM_CHARS, seed=0)
    assert set(text) == set(CHARLM_VOCAB) and len(CHARLM_VOCAB) == 30
    assert generate_text(1000) == text[:1000]
    assert generate_text(1000, seed=1) != text[:1000]
    sentence = text.split(". ")[1]
    assert sentence.split()[0] and sentence == sentence.lower()
    assert text.count(".") > 4000  # about 4,800 sentences
