"""Config parsing: YAML + typed overrides, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from geolinrpe.train import Config
from geolinrpe.train.config import parse_override

CONFIGS = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))


def test_defaults_round_trip_through_dict_and_yaml():
    cfg = Config()
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_overrides_are_parsed_and_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {task: qm9, targets: [gap]}\noptim: {lr: 0.01}\n")
    cfg = Config.load(
        path,
        [
            "optim.lr=1e-3",  # YAML 1.1 reads this as a string: coerced for a float field
            "optim.warmup_steps=1e2",  # an integral float for an int field
            "data.targets=[homo, lumo]",
            "model.rpe=null",
            "model.rpe_options.lengthscale=2",
            "model.options={cutoff: 4.5}",
            "train.max_steps=50",
            "train.progress=false",
            "optim.betas=[0.8, 0.99]",
            "data.batch_size=8",
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.warmup_steps == 100 and isinstance(cfg.optim.warmup_steps, int)
    assert cfg.data.targets == ["homo", "lumo"]
    assert cfg.model.rpe is None
    assert cfg.model.rpe_options == {"lengthscale": 2}
    assert cfg.model.options == {"cutoff": 4.5}
    assert cfg.train.max_steps == 50 and cfg.train.progress is False
    assert cfg.optim.betas == [0.8, 0.99]
    # a scalar for a list field becomes a one-element list
    assert Config.load(None, ["data.targets=gap"]).data.targets == ["gap"]
    # replace() applies overrides to an existing config
    assert cfg.replace(["data.batch_size=4"]).data.batch_size == 4


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=0.1", "optim.lrr"),  # unknown key in a section
        ("trian.epochs=3", "trian"),  # unknown section
        ("optim.lr=fast", "optim.lr"),  # wrong type
        ("train.epochs=2.5", "train.epochs"),  # not an integer
        ("train.progress=1", "train.progress"),  # an int is not a bool
        ("model.mode=sum", "model.mode"),  # not one of the choices
        ("train.device=tpu", "train.device"),
        ("data.task=qm10", "data.task"),
        ("data.targets=[gap, nonsense]", "data.targets"),  # unknown QM9 target
        ("data.batch_size=0", "data.batch_size"),  # must be positive
        ("optim.lr=-1", "optim.lr"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.rpe_lr_scale=0", "optim.rpe_lr_scale"),
        ("model.rpe=flt-nothing", "model.rpe"),  # not an RPE of the registry
        ("model.num_heads=5", "model.embed_dim"),  # 128 not divisible by 5
        ("model.rpe_options=3", "model.rpe_options"),  # a mapping expected
        ("optim.lr.x=1", "optim.lr"),  # a value is not a section
        ("model.name=transformer", "model.name"),  # not a model of the registry
        ("model.options={no_such_option: 1}", "model.options.no_such_option"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=f"'{key}"):
        Config.load(None, [override])


def test_model_options_must_apply_to_the_model():
    cfg = Config.load(None, ["model.name=schnet", "model.options={cutoff: 4.0}"])
    kwargs = cfg.model_kwargs()
    assert kwargs == {"cutoff": 4.0}  # the attention defaults do not reach SchNet
    with pytest.raises(ValueError, match="'model.rpe' does not apply to model 'schnet'"):
        Config.load(None, ["model.name=schnet", "model.rpe=null"])
    kwargs = Config.load(None, ["model.options={use_spherical_harmonics: true}"]).model_kwargs()
    assert kwargs["rpe"] == "flt-kernel" and kwargs["use_spherical_harmonics"] is True


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ValueError, match="did you mean 'train.epochs'"):
        Config.from_dict({"train": {"epoch": 3}})


def test_malformed_overrides_and_files(tmp_path):
    for bad in ("optim.lr", "=3", "optim..lr=3", "optim.lr=[1,"):
        with pytest.raises(ValueError, match="override"):
            parse_override(bad)
    with pytest.raises(ValueError, match="does not exist"):
        Config.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        Config.load(tmp_path / "list.yaml")
    (tmp_path / "section.yaml").write_text("optim: 3\n")
    with pytest.raises(ValueError, match="'optim' must be a mapping"):
        Config.load(tmp_path / "section.yaml")


def test_validate_checks_data_paths(tmp_path):
    for task in ("oc20-is2re", "sequence"):
        with pytest.raises(ValueError, match="'data.path'"):
            Config.load(None, [f"data.task={task}", "data.path=null"])
        cfg = Config.load(None, [f"data.task={task}", f"data.path={tmp_path / 'nowhere'}"])
        with pytest.raises(ValueError, match="'data.path'.*does not exist"):
            cfg.validate()
    cfg = Config.load(
        None,
        ["data.task=oc20-is2re", f"data.path={tmp_path}", f"data.valid_path={tmp_path / 'x'}"],
    )
    with pytest.raises(ValueError, match="'data.valid_path'"):
        cfg.validate()
    cfg = Config.load(None, ["data.source=pyg-raw", f"data.path={tmp_path}"])
    with pytest.raises(ValueError, match="'data.path'.*raw/"):
        cfg.validate()
    cfg = Config.load(None, [f"train.resume={tmp_path / 'none.pt'}"])
    with pytest.raises(ValueError, match="'train.resume'"):
        cfg.validate()
    Config.load(None, [f"data.path={tmp_path}"]).validate()  # qm9pack is installed


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_load(path):
    cfg = Config.load(path)
    assert Config.from_dict(cfg.to_dict()) == cfg
    text = path.read_text()
    assert "Assumes:" in text and "batch" in text  # each states its hardware and batch size


def test_all_example_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "qm9_gap_flt.yaml",
        "qm9_gap_linear.yaml",
        "qm9_gap_exact.yaml",
        "qm9_gap_schnet.yaml",
        "oc20_is2re_synthetic.yaml",
        "point_cloud.yaml",
        "digits_patches.yaml",
        "sequence_lm.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_do_not_pin_threads(path):
    """Shipped configs leave ``train.num_threads`` to torch/OMP_NUM_THREADS (issue 14)."""
    raw = yaml.safe_load(path.read_text())
    assert "num_threads" not in raw.get("train", {})
    assert Config.load(path).train.num_threads is None


def test_unknown_rpe_option_names_key_rpe_and_suggestion():
    with pytest.raises(ValueError) as info:
        Config.load(None, ["model.rpe=flt-kernel", "model.rpe_options={num_frequency: 8}"])
    message = str(info.value)
    assert message.startswith("config key 'model.rpe_options.num_frequency'")
    assert "did you mean 'num_frequencies'?" in message
    assert "ShiftInvariantKernelRPE" in message and "'flt-kernel'" in message
    for valid in ("amplitude", "kernel", "lengthscale", "num_frequencies", "orthogonal"):
        assert valid in message
    # the RPE decides: max_index is an option of flt-periodic only
    Config.load(None, ["model.rpe=flt-periodic", "model.rpe_options={max_index: 1}"])
    with pytest.raises(ValueError, match=r"model\.rpe_options\.max_index.*flt-radial"):
        Config.load(None, ["model.rpe=flt-radial", "model.rpe_options={max_index: 1}"])
    with pytest.raises(ValueError, match=r"model\.options\.cutof'.*did you mean 'cutoff'\?"):
        Config.load(None, ["model.options={cutof: 4.0}"])


def test_config_keys_cover_every_field_with_type_default_and_description():
    import dataclasses

    from geolinrpe.train.config import config_keys, format_config_keys

    listed = {k.key: k for k in config_keys()}
    expected = {}
    for section in dataclasses.fields(Config):
        instance = section.default_factory()
        for f in dataclasses.fields(instance):
            expected[f"{section.name}.{f.name}"] = getattr(instance, f.name)
    assert list(listed) == list(expected)  # every field, in file order
    text = format_config_keys()
    lines = text.splitlines()
    for key, default in expected.items():
        assert listed[key].default == default
        assert len(listed[key].description) > 10, key  # parsed from the docstring
        word = yaml.safe_dump(default, default_flow_style=True).removesuffix("...\n").strip()
        header = f"{key}: {listed[key].type} = {word}"
        assert header in lines, header
        assert lines[lines.index(header) + 1].startswith("    ")  # the description follows
    assert "optim.lr: float = 0.0005" in lines
    assert "train.num_threads: int | null = null" in lines
    assert "data.targets: list[str] = [gap]" in lines
    assert "``" not in text and ":class:" not in text
    assert max(len(line) for line in lines if line.startswith("    ")) <= 100
    only = format_config_keys(["optim"]).splitlines()
    assert only[0].startswith("optim.optimizer:") and not any(
        line.startswith(("data.", "model.", "train.")) for line in only
    )
    with pytest.raises(ValueError, match="unknown config section 'nope'"):
        format_config_keys(["nope"])
