"""Tests for job.config: named and file configs, `--set` overrides, type coercion and validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from job.config import CONFIG_DIR, DEFAULT_CONFIG, Config, available_configs, load_config
from job.errors import JobError
from job.pipelines import one_pass_steps
from job.pretext import _epoch_note

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def expect_error(*overrides: str, source: str | None = None) -> str:
    """The message of the JobError that loading the config with these overrides raises."""
    with pytest.raises(JobError) as caught:
        load_config(source, overrides)
    assert caught.value.exit_code == 2
    return str(caught.value)


def test_default_config_is_demo_and_loads():
    assert DEFAULT_CONFIG == "demo"
    config = load_config()
    assert isinstance(config, Config)
    assert config == load_config("demo")
    # values from demo.toml, not the dataclass defaults
    assert config.data.image_size == 32
    assert config.model.alpha == 0.35
    assert config.pretext.epochs == 10
    assert config.finetune.seeds == 2 and config.finetune.head_init == "probe"
    assert config.evaluate.label_fractions == [0.1, 1.0]


def test_named_config_by_path_equals_by_name():
    assert load_config(str(CONFIG_DIR / "demo.toml")) == load_config("demo")


@pytest.mark.parametrize("name", available_configs())
def test_every_shipped_config_loads(name):
    config = load_config(name)
    assert isinstance(config, Config)
    assert set(config.to_dict()) == {"data", "model", "pretext", "finetune", "evaluate", "runtime"}


MINI_SET_TRAIN_IMAGES = 8820  # ../shared/data/tiny-imagenet-200-mini.zip: 198 x 40 + 2 x 450


def test_cpu_real_fixes_the_pretext_epoch_at_the_mini_sets_one_pass():
    """cpu-real's epoch is the mini set's one pass (so its runs there are those of steps_per_epoch = 0) and the
    same steps on any other set: its minutes do not grow with the set, as one pass would (the plan: test_pipelines)."""
    pretext = load_config("cpu-real").pretext
    assert pretext.steps_per_epoch == one_pass_steps(MINI_SET_TRAIN_IMAGES, pretext.batch_images)
    assert _epoch_note(pretext, MINI_SET_TRAIN_IMAGES) == ""
    assert _epoch_note(pretext, 9712) == " (pretext.steps_per_epoch: 8,832 of the 9,712 images an epoch)"
    assert _epoch_note(pretext, 4000) == " (pretext.steps_per_epoch: 2.21 passes over the images an epoch)"


def test_available_configs_lists_toml_files():
    names = available_configs()
    assert "demo" in names
    assert names == sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("pretext.epochs=3", "pretext", "epochs", 3),
        ("model.alpha=0.5", "model", "alpha", 0.5),
        ("pretext.online_probe=false", "pretext", "online_probe", False),
        ("evaluate.scratch_baseline=true", "evaluate", "scratch_baseline", True),
        ("model.weights=imagenet", "model", "weights", "imagenet"),
        ('model.weights="imagenet"', "model", "weights", "imagenet"),
        ("evaluate.label_fractions=[0.1, 1.0]", "evaluate", "label_fractions", [0.1, 1.0]),
        ('data.downstream_wnids=["n1", "n2"]', "data", "downstream_wnids", ["n1", "n2"]),
        ("finetune.mode=linear", "finetune", "mode", "linear"),
        ("pretext.learning_rate=1e-4", "pretext", "learning_rate", 1e-4),
        (" pretext.epochs = 4 ", "pretext", "epochs", 4),
    ],
)
def test_set_overrides(override, section, key, expected):
    config = load_config("demo", [override])
    value = getattr(getattr(config, section), key)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, list):
        assert all(type(v) is type(e) for v, e in zip(value, expected, strict=True))


def test_overrides_apply_in_order_and_leave_other_keys():
    base = load_config("demo")
    config = load_config("demo", ["pretext.epochs=3", "pretext.epochs=5"])
    assert config.pretext.epochs == 5
    assert config.pretext.batch_images == base.pretext.batch_images
    assert config.model == base.model


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("model.alpha=1", "model", "alpha", 1.0),
        ("runtime.sync_interval_s=30", "runtime", "sync_interval_s", 30.0),
        ("evaluate.label_fractions=[1, 0.5]", "evaluate", "label_fractions", [1.0, 0.5]),
    ],
)
def test_int_for_float_key_becomes_float(override, section, key, expected):
    value = getattr(getattr(load_config("demo", [override]), section), key)
    assert value == expected
    if isinstance(value, list):
        assert all(type(v) is float for v in value)
    else:
        assert type(value) is float


def test_toml_file_with_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[pretext]\nepochs = 2\n\n[model]\nalpha = 1\n")
    config = load_config(str(path), ["pretext.batch_images=16"])
    assert config.pretext.epochs == 2
    assert config.model.alpha == 1.0 and type(config.model.alpha) is float
    assert config.pretext.batch_images == 16
    assert config.data.image_size == Config().data.image_size  # not from demo.toml


def test_unknown_section():
    message = expect_error("nope.epochs=3")
    assert "unknown section 'nope'" in message
    assert "--set nope.epochs=3" in message
    assert "pretext" in message  # lists valid sections


def test_unknown_key():
    message = expect_error("pretext.nope=1")
    assert "unknown key 'pretext.nope'" in message
    assert "epochs" in message  # lists valid keys


@pytest.mark.parametrize(
    ("override", "key", "type_name"),
    [
        ("pretext.epochs=abc", "pretext.epochs", "int"),
        ("pretext.epochs=1.5", "pretext.epochs", "int"),
        ("pretext.epochs=true", "pretext.epochs", "int"),
        ("model.alpha=true", "model.alpha", "float"),
        ("pretext.online_probe=1", "pretext.online_probe", "bool"),
        ("pretext.online_probe=yes", "pretext.online_probe", "bool"),
        ("model.weights=5", "model.weights", "str"),
        ("evaluate.label_fractions=[0.5, \"x\"]", "evaluate.label_fractions", "float"),
    ],
)
def test_wrong_type(override, key, type_name):
    message = expect_error(override)
    assert key in message
    assert f"type {type_name}" in message


def test_scalar_for_list_key():
    message = expect_error("evaluate.label_fractions=0.5")
    assert "evaluate.label_fractions" in message
    assert "must be a list" in message


@pytest.mark.parametrize("override", ["pretext.epochs", "epochs=3", "pretext.=3", "=3", ""])
def test_malformed_override(override):
    message = expect_error(override)
    assert "malformed" in message
    assert repr(override) in message
    assert "section.key=value" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("finetune.mode=foo", "finetune.mode"),
        ("pretext.optimizer=adam", "pretext.optimizer"),
        ("runtime.xla=yes", "runtime.xla"),
        ("runtime.mixed_precision=maybe", "runtime.mixed_precision"),
        ("model.stem_stride=4", "model.stem_stride"),
        ("data.store=jpeg", "data.store"),
    ],
)
def test_bad_choice(override, key):
    message = expect_error(override)
    assert key in message
    assert "not allowed" in message


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["finetune.label_fraction=0"], ["label fractions", "(0, 1]"]),
        (["finetune.label_fraction=1.5"], ["label fractions", "1.5"]),
        (["evaluate.label_fractions=[0.5, 1.5]"], ["label fractions", "1.5"]),
        (["evaluate.label_fractions=[0.0]"], ["label fractions"]),
        (["data.image_size=16"], ["data.image_size", "16", "32"]),
        (["data.image_size=0"], ["data.image_size", "positive"]),
        (["pretext.epochs=-1"], ["pretext.epochs", "-1"]),
        (["model.alpha=0"], ["model.alpha", "positive"]),
        (["runtime.sync_interval_s=0"], ["runtime.sync_interval_s", "positive"]),
        (["pretext.batch_images=0"], ["pretext.batch_images"]),
        (["data.crop_padding=-2"], ["data.crop_padding"]),
        (["pretext.min_crop_area=0"], ["pretext.min_crop_area", "(0, 1]"]),
        (["pretext.min_crop_area=1.2"], ["pretext.min_crop_area", "1.2"]),
        (["finetune.min_crop_area=0"], ["finetune.min_crop_area", "(0, 1]", "finetune crop"]),
        (["finetune.min_crop_area=-0.5"], ["finetune.min_crop_area", "-0.5"]),
        (['data.downstream_wnids=["n01443537", "n01443537"]'], ["data.downstream_wnids"]),
        (['data.downstream_wnids=["n01443537"]'], ["data.downstream_wnids"]),
        (["model.weights=/no/such/file.weights.h5"], ["model.weights", "/no/such/file.weights.h5"]),
        (["data.sha256=abc123"], ["data.sha256", "abc123", "64 hex digits"]),
        (["data.sha256=" + "g" * 64], ["data.sha256", "64 hex digits"]),
    ],
)
def test_out_of_range(overrides, fragments):
    message = expect_error(*overrides)
    for fragment in fragments:
        assert fragment in message


def test_a_sha256_is_accepted_in_either_case():
    digest = "0123456789abcdef" * 4
    assert load_config("demo", [f"data.sha256={digest.upper()}"]).data.sha256 == digest.upper()
    assert load_config("demo").data.sha256 == ""


def test_in_range_edges_are_accepted():
    config = load_config("demo", ["data.image_size=32", "finetune.label_fraction=1.0", "pretext.epochs=1",
                                  "pretext.min_crop_area=1", "finetune.min_crop_area=1"])
    assert (config.data.image_size, config.finetune.label_fraction, config.pretext.epochs) == (32, 1.0, 1)
    assert config.pretext.min_crop_area == config.finetune.min_crop_area == 1.0


def test_weights_path_to_existing_file_is_accepted(tmp_path):
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(HDF5_SIGNATURE)
    assert load_config("demo", [f"model.weights={weights}"]).model.weights == str(weights)


@pytest.mark.parametrize("key", ["pretext.epochs", "finetune.epochs", "pretext.eval_every_epochs"])
def test_zero_epochs_is_an_error(key):
    """Before: pretext.epochs=0 exported an untrained backbone as pretrained; finetune.epochs=0 divided by 0;
    pretext.eval_every_epochs=0 would divide by 0 after the first epoch."""
    assert f"{key} = 0 must be positive" in expect_error(f"{key}=0")


@pytest.mark.parametrize(("name", "content", "fragment"), [
    ("notes.txt", HDF5_SIGNATURE, "is not a weights file"),
    ("w.weights.h5", b"plain text", "wrong signature"),
    ("backbone.keras", b"plain text", "wrong signature"),
])
def test_weights_that_are_not_a_weights_file(tmp_path, name, content, fragment):
    """Before: accepted by validation; the run then failed after --force had deleted the completed stages."""
    path = tmp_path / name
    path.write_bytes(content)
    message = expect_error(f"model.weights={path}")
    assert fragment in message and str(path) in message and "model.weights" in message


def test_unknown_depth_probe_layer_is_an_error():
    """Before: accepted; evaluate failed on it after the downstream runs (and after --force deleted them)."""
    message = expect_error('evaluate.depth_probe_layers=["block_5_add", "block_99_add"]')
    assert "evaluate.depth_probe_layers" in message and "block_99_add" in message and "block_5_add'" not in message


def test_missing_config_file(tmp_path):
    missing = tmp_path / "absent.toml"
    message = expect_error(source=str(missing))
    assert str(missing) in message
    assert "does not exist" in message


def test_unknown_config_name():
    message = expect_error(source="no_such_config")
    assert "no_such_config" in message
    assert "demo" in message  # lists the available names


def test_invalid_toml_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[pretext\nepochs = 3\n")
    message = expect_error(source=str(path))
    assert str(path) in message
    assert "not valid TOML" in message


def test_toml_top_level_key_is_rejected(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text("epochs = 3\n")
    message = expect_error(source=str(path))
    assert str(path) in message
    assert "'epochs'" in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[pretext]\nnope = 1\n", "unknown key 'pretext.nope'"),
        ("[nope]\nepochs = 1\n", "unknown section 'nope'"),
        ("[pretext]\nepochs = \"ten\"\n", "pretext.epochs"),
        ("[data]\nimage_size = 8\n", "data.image_size"),
    ],
)
def test_bad_toml_content_names_file_and_key(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    message = expect_error(source=str(path))
    assert fragment in message
    if "unknown" in fragment or "epochs" in fragment:
        assert str(path) in message


def test_to_dict_round_trips_through_toml_sections(tmp_path):
    """Every key of to_dict() is accepted back as an override: the schema and the loader agree."""
    config = load_config("demo")
    overrides = []
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if isinstance(value, bool):
                text = str(value).lower()
            elif isinstance(value, (list, str)):
                text = repr(value).replace("'", '"')
            else:
                text = repr(value)
            overrides.append(f"{section}.{key}={text}")
    assert load_config("demo", overrides) == config


def test_config_dir_is_the_package_configs():
    assert CONFIG_DIR == Path(__file__).resolve().parents[2] / "job" / "configs"


@pytest.mark.parametrize("value, fragment", [
    ('["block_9_add", "block_99_add"]', "block_99_add"),
    ('["auto", "block_9_add"]', "alone"),
    ("[]", "is not allowed"),
])
def test_bad_transfer_layers_are_errors(value, fragment):
    message = expect_error(f"finetune.transfer_layers={value}")
    assert "finetune.transfer_layers" in message and fragment in message


def test_transfer_layers_accept_names_and_auto():
    assert load_config("demo", ['finetune.transfer_layers=["block_2_add", "block_9_add"]']).finetune.transfer_layers \
        == ["block_2_add", "block_9_add"]
    assert load_config("demo", ['finetune.transfer_layers=["auto"]']).finetune.transfer_layers == ["auto"]


def test_pretext_frozen_through_names_a_mobilenet_layer():
    assert load_config("demo", ["pretext.frozen_through=block_2_add"]).pretext.frozen_through == "block_2_add"
    assert load_config("demo", []).pretext.frozen_through == ""
    message = expect_error("pretext.frozen_through=block_2")
    assert "pretext.frozen_through" in message and "'block_2'" in message


def test_pretext_head_layer_must_lie_past_the_frozen_layers():
    config = load_config("demo", ["pretext.frozen_through=block_2_add", "pretext.head_layer=block_12_add"])
    assert config.pretext.head_layer == "block_12_add" and load_config("demo", []).pretext.head_layer == "out_relu"
    message = expect_error("pretext.frozen_through=block_5_add", "pretext.head_layer=block_5_project_BN")
    assert "pretext.head_layer = 'block_5_project_BN'" in message
    assert "pretext.frozen_through = 'block_5_add'" in message
    assert "pretext.head_layer" in expect_error("pretext.head_layer=block_99_add")
