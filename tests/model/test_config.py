import pytest

from hyena_glt import HyenaGLTConfig


def test_defaults_and_derived():
    cfg = HyenaGLTConfig(pattern="SDH*|SDH*", d_model=64, num_heads=4, num_filter_groups=8)
    assert cfg.layers == "SDH*SDH*" and cfg.num_layers == 8
    assert cfg.stage_layer_counts == [4, 4]
    assert cfg.short_filter_len == 7 and cfg.featurizer_len == 3
    assert cfg.medium_filter_len == 128 and cfg.modal_order == 16
    assert cfg.mlp_hidden % cfg.mlp_multiple_of == 0


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(pattern="SDX*"), "pattern"),
        (dict(pattern=""), "pattern"),
        (dict(pattern="SD||H*"), "pattern"),
        (dict(pattern="|SDH"), "pattern"),
        (dict(d_model=0), "d_model"),
        (dict(d_model=64, num_heads=5), "num_heads"),
        (dict(d_model=48, num_heads=16), "num_heads"),  # odd head dim: no RoPE
        (dict(d_model=64, num_heads=4, num_filter_groups=6), "num_filter_groups"),
        (dict(vocab_size=100), "vocab_size"),
        (dict(mlp_activation="relu6"), "mlp_activation"),
        (dict(soft_mask_weight=1.5), "soft_mask_weight"),
        (dict(medium_decay_min=2.0, medium_decay_max=1.0), "medium_decay_min"),
        (dict(motif_kernel_sizes=[]), "motif_kernel_sizes"),
        (dict(unknown_field=1), "unknown_field"),
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    base = dict(d_model=64, num_heads=4, num_filter_groups=8)
    with pytest.raises(ValueError, match=field):
        HyenaGLTConfig(**{**base, **kwargs})


def test_assignment_is_validated():
    cfg = HyenaGLTConfig(d_model=64, num_heads=4, num_filter_groups=8)
    with pytest.raises(ValueError, match="pattern"):
        cfg.pattern = "Q"


def test_yaml_and_json_round_trip(tmp_path):
    cfg = HyenaGLTConfig(pattern="SDH*", d_model=64, num_heads=4, num_filter_groups=8, seed=7, motif_branch=True)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert HyenaGLTConfig.from_yaml(tmp_path / "c.yaml") == cfg
    cfg.to_json(tmp_path / "c.json")
    assert HyenaGLTConfig.from_json(tmp_path / "c.json") == cfg


def test_yaml_model_section_of_a_training_config(tmp_path):
    (tmp_path / "t.yaml").write_text("model:\n  pattern: 'S*'\n  d_model: 32\n  num_heads: 2\n  num_filter_groups: 4\ntrain:\n  steps: 3\n")
    assert HyenaGLTConfig.from_yaml(tmp_path / "t.yaml").pattern == "S*"
