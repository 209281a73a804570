"""Long-range electrostatics: a learned reciprocal-space energy against cutoff models.

Data: :mod:`geolinrpe.data.molten_salt` (Na/Cl boxes, random species, energies = Ewald +
Tosi-Fumi repulsion, forces), written in OC20's S2EF LMDB format under ``--data`` on first
use and read back with :class:`geolinrpe.data.OC20`, as the CLI reads it. Every model
predicts the energy and its forces (``-dE/dpos``) and uses the same per-atom energy reference
and scale, fitted on its training set (``atom_refs`` = mean energy per atom, so a model
trained on 64-ion boxes is not given the per-atom mean of larger ones). ``MODELS``:

* ``flt-periodic``: :class:`geolinrpe.models.MoleculeTransformer` (embed 64, 4 heads,
  spherical-harmonics features within 5 Å, 1 block of linear attention without RPE) with the
  ``flt-periodic`` Coulomb-spectrum attention as its energy readout,
  :class:`geolinrpe.nn.reciprocal.ReciprocalEnergy` (4 channels of latent charges,
  ``max_index`` 4: 365 lattice frequencies, completed diagonal): O(n);
* ``no-rpe``: the same model without that readout (what the attention block sees is the
  same; nothing reaches beyond the 5 Å features except the block's RPE-free mean field);
* ``schnet``: :class:`geolinrpe.models.SchNetBaseline` (64 channels, 3 interactions,
  periodic radius graph, cutoff 5 Å);
* ``exact``: ``flt-periodic`` with exact softmax attention (``ExactRPEAttention``) and the
  dense readout (:meth:`ReciprocalEnergy.reference`): O(n^2), run while its dense
  ``[h, n, n, M]`` pair data fit ``--exact-limit-gib`` (not at 4,096 ions).

(The same model with ``flt-periodic`` inside the attention blocks, mask mode with
``normalize="none"``, measured 59.5 meV/atom on 64-ion boxes but 440 meV/atom on 512-ion
boxes after training on 64: unnormalised attention sums over 8x more atoms drifted. The
readout form transferred best and is the one benchmarked.)

Part 1, accuracy at equal wall-clock budget: each model trains for ``--budget`` seconds
(AdamW, lr 1e-3, cosine in elapsed time, loss = MSE of the energy per atom and of the
forces, each over its training-set standard deviation) on boxes of ``--train-atoms`` ions,
then is tested on held-out boxes of the same size and of 8x as many ions (2x the side).
Models run one after another, not interleaved (each needs both cores for its budget); the
load average is recorded.

Part 2, cost: median of 3 training steps (forward, forces, backward, AdamW) on one box of N
ions after a warm-up step, N from 64 to 4,096, and the log-log slope of step time against
N (least squares over the sizes).

    python benchmarks/long_range.py --json benchmarks/results/long_range.json
    python benchmarks/long_range.py --quick     # small sets, 20 s budgets, N <= 512

JSON records: ``{"part": "accuracy", "model", "train_atoms", "n_atoms", "energy_mae_mev_per_atom",
"energy_bias_mev_per_atom" (mean signed error), "force_mae_mev_per_a", "step_seconds", "steps",
...}``, ``{"part": "cost", "model", "n_atoms",
"step_seconds"}`` and ``{"part": "slope", "model", "slope"}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from torch_geometric.data import Batch

from geolinrpe.data import OC20
from geolinrpe.data.molten_salt import make_molten_salt
from geolinrpe.models import MoleculeTransformer, SchNetBaseline

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("flt-periodic", "no-rpe", "schnet", "exact")
RECIPROCAL = dict(num_channels=4, max_index=4)
#: training boxes, test sets and batch sizes per training size
SETS = {64: dict(train=1000, test=64, batch=8), 512: dict(train=150, test=16, batch=1)}
TEST_SETS = {64: 64, 512: 16, 4096: 6}
EXACT_LIMIT_GIB = 4.0


def dataset(root: Path, num_atoms: int, count: int, seed: int) -> OC20:
    """The molten-salt boxes as an OC20 S2EF LMDB (written on first use)."""
    path = root / f"molten_salt_{num_atoms}_{count}_seed{seed}"
    if not path.exists():
        t0 = time.perf_counter()
        make_molten_salt(path, count, num_atoms, format="lmdb-s2ef", seed=seed)
        print(f"wrote {count} boxes of {num_atoms} ions in {time.perf_counter() - t0:.0f} s")
    return OC20(str(path), task="s2ef")


def statistics_of(data: OC20, num_atoms: int) -> dict[str, float]:
    energy = torch.stack([data[i].y.reshape(()) for i in range(len(data))]).double()
    per_atom = float(energy.mean()) / num_atoms
    if len(data) < 2:  # one box (the cost part): unit scales
        return {"per_atom": per_atom, "energy_std": float(num_atoms), "force_std": 1.0}
    forces = torch.cat([data[i].force for i in range(len(data))])
    return {
        "per_atom": per_atom,
        "energy_std": float((energy / num_atoms - per_atom).std()) * num_atoms,
        "force_std": float(forces.std()),
    }


def build(name: str, stats: dict[str, float], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    refs = torch.zeros(18)
    refs[[11, 17]] = stats["per_atom"]
    common = dict(
        num_targets=1,
        atom_refs=refs,
        target_mean=0.0,
        target_std=stats["energy_std"],
        predict_forces=True,
    )
    if name == "schnet":
        return SchNetBaseline(
            hidden_channels=64,
            num_filters=64,
            num_interactions=3,
            cutoff=5.0,
            periodic=True,
            **common,
        )
    return MoleculeTransformer(
        embed_dim=64,
        num_heads=4,
        num_layers=1,
        attention="exact" if name == "exact" else "linear",
        rpe=None,
        use_spherical_harmonics=True,
        cutoff=5.0,
        periodic=True,
        reciprocal_energy=None if name == "no-rpe" else dict(RECIPROCAL),
        **common,
    )


def exact_fits(num_atoms: int, limit_gib: float) -> bool:
    """The dense readout's pair data: h n^2 M float32 values, three times (values, phases,
    weights)."""
    frequencies = ((2 * RECIPROCAL["max_index"] + 1) ** 3 + 1) // 2
    return 3 * 4 * RECIPROCAL["num_channels"] * num_atoms**2 * frequencies / 2**30 <= limit_gib


def loss_of(model, batch, stats):
    out = model(batch)
    energy = (out["energy"] - batch.y.reshape(-1).to(out["energy"].dtype)) / stats["energy_std"]
    forces = (out["forces"] - batch.force) / stats["force_std"]
    return energy.pow(2).mean() + forces.pow(2).mean()


def train_for(model, data: OC20, stats, batch_size: int, budget: float) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        index = torch.randint(len(data), (batch_size,), generator=generator).tolist()
        loss = loss_of(model, Batch.from_data_list([data[i] for i in index]), stats)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        steps += 1
    seconds = time.perf_counter() - start
    return {"steps": steps, "step_seconds": seconds / max(steps, 1), "train_seconds": seconds}


def evaluate(model, data: OC20, num_atoms: int) -> dict:
    model.eval()
    energy_err, force_err, force_count = [], 0.0, 0
    step = max(1, 512 // num_atoms)
    for start in range(0, len(data), step):
        batch = Batch.from_data_list([data[i] for i in range(start, min(start + step, len(data)))])
        out = model(batch)
        diff = out["energy"].detach().double() - batch.y.reshape(-1).double()
        energy_err.append(diff / num_atoms)
        force_err += float((out["forces"].detach() - batch.force).abs().sum())
        force_count += batch.force.numel()
    signed = torch.cat(energy_err)
    return {
        "energy_mae_mev_per_atom": 1000 * float(signed.abs().mean()),
        "energy_bias_mev_per_atom": 1000 * float(signed.mean()),
        "force_mae_mev_per_a": 1000 * force_err / force_count,
    }


def learned(model) -> dict:
    reciprocal = getattr(model, "reciprocal", None)
    if reciprocal is None:
        return {}
    return {
        "lengthscales_a": [round(v, 3) for v in reciprocal.rpe.lengthscale.tolist()],
        "amplitudes_ev_a": [round(v, 3) for v in reciprocal.rpe.amplitude.tolist()],
    }


def accuracy(args, root: Path) -> list[dict]:
    records = []
    for train_atoms in args.train_atoms:
        sizes = SETS[train_atoms]
        train = dataset(root, train_atoms, sizes["train"] if not args.quick else 64, seed=1)
        stats = statistics_of(train, train_atoms)
        tests = {
            n: dataset(root, n, TEST_SETS[n] if not args.quick else 4, seed=2)
            for n in (train_atoms, 8 * train_atoms)
        }
        for name in args.models:
            if name == "exact" and not exact_fits(train_atoms, args.exact_limit_gib):
                continue
            model = build(name, stats)
            load = os.getloadavg()[0]
            fit = train_for(model, train, stats, sizes["batch"], args.budget)
            for n, test in tests.items():
                if name == "exact" and not exact_fits(n, args.exact_limit_gib):
                    records.append(
                        {
                            "part": "accuracy",
                            "model": name,
                            "train_atoms": train_atoms,
                            "n_atoms": n,
                            "not_run": f"dense pair data over {args.exact_limit_gib} GiB",
                        }
                    )
                    continue
                record = {
                    "part": "accuracy",
                    "model": name,
                    "train_atoms": train_atoms,
                    "n_atoms": n,
                    **evaluate(model, test, n),
                    **fit,
                    "budget_s": args.budget,
                    "test_boxes": len(test),
                    "load_avg_1min": round(load, 2),
                    **learned(model),
                }
                records.append(record)
                print(
                    f"{name:13s} train {train_atoms:5d} test {n:5d}: energy "
                    f"{record['energy_mae_mev_per_atom']:8.1f} meV/atom, forces "
                    f"{record['force_mae_mev_per_a']:7.0f} meV/A, {fit['steps']} steps",
                    flush=True,
                )
    return records


def cost(args, root: Path) -> list[dict]:
    records = []
    for name in args.cost_models:
        times = {}
        for n in args.cost_atoms:
            if name == "exact" and not exact_fits(n, args.exact_limit_gib):
                continue
            data = dataset(root, n, 1, seed=3)
            stats = statistics_of(data, n)
            model = build(name, stats)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            batch = Batch.from_data_list([data[0]])
            model.train()
            samples = []
            for k in range(4):
                start = time.perf_counter()
                loss = loss_of(model, batch, stats)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if k:
                    samples.append(time.perf_counter() - start)
            times[n] = statistics.median(samples)
            records.append(
                {
                    "part": "cost",
                    "model": name,
                    "n_atoms": n,
                    "step_seconds": times[n],
                    "load_avg_1min": round(os.getloadavg()[0], 2),
                }
            )
            print(f"{name:13s} N = {n:5d}: {times[n]:.3f} s per step", flush=True)
        if len(times) > 1:
            x = torch.tensor([math.log(n) for n in times], dtype=torch.float64)
            y = torch.tensor([math.log(t) for t in times.values()], dtype=torch.float64)
            slope = float(((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum())
            records.append({"part": "slope", "model": name, "slope": slope, "sizes": list(times)})
            print(f"{name:13s} log-log slope {slope:.2f} over N = {list(times)}")
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "long_range"), help="cache folder")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--train-atoms", nargs="+", type=int, default=[64, 512], choices=sorted(SETS))
    p.add_argument("--budget", type=float, default=240.0, help="training seconds per model")
    p.add_argument("--cost-models", nargs="*", default=["flt-periodic", "schnet"], choices=MODELS)
    p.add_argument("--cost-atoms", nargs="+", type=int, default=[64, 216, 512, 1728, 4096])
    p.add_argument("--exact-limit-gib", type=float, default=EXACT_LIMIT_GIB)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sets, 20 s budgets, N <= 512")
    p.add_argument("--json", default=None, help="write the records here")
    args = p.parse_args(argv)
    if args.quick:
        args.budget = min(args.budget, 20.0)
        args.train_atoms = [64]
        args.cost_atoms = [n for n in args.cost_atoms if n <= 512]
    root = Path(args.data)
    records = [] if args.skip_accuracy else accuracy(args, root)
    records += cost(args, root)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
