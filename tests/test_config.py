import pytest

from diet_ray import config as C
from diet_ray.cli import main
from diet_ray.errors import ConfigError


def test_defaults_run_with_no_file():
    cfg = C.load_config(None, [])
    assert cfg.data.source.startswith("synthetic://")
    assert cfg.memory.ratio == 0.01
    assert len(cfg.evaluate.candidates) >= 7


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  label: 'rating >= 4'\n  stages: {by: rows, count: 5}\nseed: 7\n")
    cfg = C.load_config(str(p), ["seed=9", "memory.ratio=0.02"])
    assert cfg.data.label == "rating >= 4" and cfg.data.stages.count == 5
    assert cfg.seed == 9 and cfg.memory.ratio == 0.02


@pytest.mark.parametrize(
    "override, expect",
    [
        ("memory.rato=0.1", "Did you mean 'memory.ratio'"),
        ("data.sourc=x", "Did you mean 'data.source'"),
        ("distil.unroll=2", "Did you mean 'distill.unroll'"),
    ],
)
def test_unknown_key_suggests_closest(override, expect):
    with pytest.raises(ConfigError, match=expect):
        C.load_config(None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("memory:\n  replace_fraction: 0.2\n")
    with pytest.raises(ConfigError) as e:
        C.load_config(str(p), [])
    assert "bad.yaml" in str(e.value) and "memory.replace_fraction" in str(e.value)
    assert "memory.replace_frac" in str(e.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="memory.ratio"):
        C.load_config(None, ["memory.ratio=abc"])


def test_enum_and_range_validation():
    with pytest.raises(ConfigError, match="Did you mean 'tracin'"):
        C.load_config(None, ["influence.estimator=tracim"])
    with pytest.raises(ConfigError, match="distill.unroll"):
        C.load_config(None, ["distill.unroll=50"])
    with pytest.raises(ConfigError, match="memory.ratio"):
        C.load_config(None, ["memory.ratio=2.0"])
    for key in ("influence.num_actors", "ray.num_workers"):  # auto (default), 0 = the driver, N >= 1
        section, leaf = key.split(".")
        get = lambda ov: getattr(getattr(C.load_config(None, ov), section), leaf)  # noqa: E731
        assert get([]) == "auto" and get([f"{key}=AUTO"]) == "auto"
        assert get([f"{key}=0"]) == 0 and get([f"{key}=3"]) == 3 and get([f"{key}='2'"]) == 2
        for bad in ("-1", "two", "1.5", "true"):
            with pytest.raises(ConfigError, match=f"{key}=.* must be 'auto' .*, 0 \\(in the driver\\) or a number of"):
                C.load_config(None, [f"{key}={bad}"])


def test_optimiser_choices_are_validated_with_a_suggestion(capsys):
    cfg = C.load_config(None, [])
    assert cfg.expert.optimizer == cfg.evaluate.train.optimizer == "lazy_adam"
    with pytest.raises(ConfigError, match=r"expert.optimizer='lazyadam' is not one of \['lazy_adam', 'adam'\]. Did you mean 'lazy_adam'"):
        C.load_config(None, ["expert.optimizer=lazyadam"])
    with pytest.raises(ConfigError, match="expert.optimizer='sgd'"):  # the student continues an Adam state
        C.load_config(None, ["expert.optimizer=sgd"])
    with pytest.raises(ConfigError, match="evaluate.train.optimizer='adamm'.*Did you mean 'adam'"):
        C.load_config(None, ["evaluate.train.optimizer=adamm"])
    assert C.load_config(None, ["evaluate.train.optimizer=adam"]).evaluate.train.optimizer == "adam"
    rc = main(["prepare", "expert.optimizer=lazy"])
    err = capsys.readouterr().err
    assert rc == 2 and "Did you mean 'lazy_adam'" in err and len(err.strip().splitlines()) == 1


def test_run_saved_before_the_expert_optimiser_key_resumes_as_dense_adam(tmp_path):
    """A run dir whose config predates ``expert.optimizer`` was trained with dense Adam."""
    from diet_ray.errors import RunStateError
    from diet_ray.layout import config_path
    from diet_ray.run_dir import open_run_dir

    run = f"run.dir={tmp_path / 'r'}"
    open_run_dir(C.load_config(None, [run, "expert.optimizer=adam"]))
    path = config_path(str(tmp_path / "r"))
    text = open(path).read()
    assert "optimizer: adam\n  batch_size" in text
    with open(path, "w") as f:
        f.write(text.replace("  optimizer: adam\n  batch_size", "  batch_size"))
    open_run_dir(C.load_config(None, [run, "expert.optimizer=adam"]))
    with pytest.raises(RunStateError, match="expert.optimizer changed"):
        open_run_dir(C.load_config(None, [run]))


def test_run_saved_before_the_distance_segment_and_student_keys_resumes_as_then(tmp_path):
    """A run dir whose config predates ``distill.distance``, ``distill.segments`` and
    ``distill.student`` was distilled with the pooled distance over the stage's own segments of
    the expert's trajectory."""
    from diet_ray.errors import RunStateError
    from diet_ray.layout import config_path
    from diet_ray.run_dir import open_run_dir

    run = f"run.dir={tmp_path / 'r'}"
    then = [run, "distill.distance=pooled", "distill.segments=stage", "distill.student=expert"]
    open_run_dir(C.load_config(None, then))
    path = config_path(str(tmp_path / "r"))
    text = open(path).read()
    for line in ("  distance: pooled\n", "  segments: stage\n", "  student: expert\n"):
        assert line in text
        text = text.replace(line, "")
    with open(path, "w") as f:
        f.write(text)
    open_run_dir(C.load_config(None, then))
    with pytest.raises(RunStateError, match="distill.segments changed"):
        open_run_dir(C.load_config(None, then[:2] + then[3:]))
    with pytest.raises(RunStateError, match="distill.student changed"):
        open_run_dir(C.load_config(None, then[:3]))


def test_config_hash_tracks_only_result_keys():
    a = C.load_config(None, [])
    b = C.load_config(None, ["run.dir=/elsewhere", "ray.num_workers=4", "evaluate.train.epochs=3"])
    c = C.load_config(None, ["memory.ratio=0.02"])
    assert C.config_hash(a) == C.config_hash(b)
    assert C.config_hash(a) != C.config_hash(c)
    assert C.diff_result_keys(C.to_dict(a), c) == ["memory.ratio"]


def test_derive_seed_is_stable_and_distinct():
    assert C.derive_seed(0, "stage", 1) == C.derive_seed(0, "stage", 1)
    assert C.derive_seed(0, "stage", 1) != C.derive_seed(0, "stage", 2)
    assert C.derive_seed(0, "stage", 1) != C.derive_seed(1, "stage", 1)


def test_cli_config_error_is_one_line_without_traceback(capsys):
    rc = main(["prepare", "memory.rato=0.1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Did you mean 'memory.ratio'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_run_dir_refuses_changed_result_key(tmp_path):
    from diet_ray.errors import RunStateError
    from diet_ray.run_dir import open_run_dir

    cfg = C.load_config(None, [f"run.dir={tmp_path / 'r'}"])
    open_run_dir(cfg)
    open_run_dir(C.load_config(None, [f"run.dir={tmp_path / 'r'}", "ray.num_workers=1"]))  # not result-affecting
    with pytest.raises(RunStateError, match="seed"):
        open_run_dir(C.load_config(None, [f"run.dir={tmp_path / 'r'}", "seed=5"]))


def test_list_item_override_and_bare_on_key(tmp_path):
    p = tmp_path / "j.yaml"
    p.write_text("data:\n  joins:\n    - source: movies.csv\n      on: movieId\n")
    cfg = C.load_config(str(p), ["data.joins.0.source=/abs/movies.csv", "data.stages={by: time, every: 1d}"])
    assert cfg.data.joins[0].on == "movieId"
    assert cfg.data.joins[0].source == "/abs/movies.csv"
    assert cfg.data.stages.by == "time" and cfg.data.stages.every == "1d"
    with pytest.raises(ConfigError, match="data.joins.3"):
        C.load_config(str(p), ["data.joins.3.source=x"])


def test_cli_overrides_anywhere_on_the_line(capsys):
    # bench has a positional; overrides may follow -c and come before or after options
    rc = main(["bench", "prepare", "memory.rato=1", "--out", "/tmp/x"])
    assert rc == 2 and "Did you mean 'memory.ratio'" in capsys.readouterr().err


def test_an_override_value_that_is_not_yaml_is_one_config_error():
    with pytest.raises(ConfigError, match=r"bench.diet_variants=.*not valid YAML.*space after each colon"):
        C.load_config(None, ["bench.diet_variants={w0:{memory.init:random}}"])
    cfg = C.load_config(None, ["bench.diet_variants={w0: {memory.init: random}}"])
    assert cfg.bench.diet_variants == {"w0": {"memory.init": "random"}}


def test_the_configs_strategy_names_are_the_registries():
    """config names the strategies without importing them (config sits below torch code);
    the registries must hold exactly those names."""
    from diet_ray.influence.estimators import ESTIMATORS
    from diet_ray.memory.selection import ROW_SELECTIONS

    assert tuple(ESTIMATORS) == C.INFLUENCE_ESTIMATORS
    assert sorted(ROW_SELECTIONS) == sorted(C.MEMORY_INITS)


def test_the_fidelity_variant_names_are_the_benchs_registry():
    from diet_ray.bench.fidelity_variants import VARIANTS

    assert sorted(VARIANTS) == sorted(C.FIDELITY_VARIANTS + C.MEMORY_PROBES)


def test_a_models_mapping_replaces_the_default_models_whole(tmp_path):
    """``expert.model`` set to another model, on the command line or in YAML, drops the default
    DNN's keys (an FM has no ``hidden``); a single key still overrides within the mapping."""
    (tmp_path / "fm.yaml").write_text("expert:\n  model: {model: fm, embed_dim: 8}\n")
    assert C.load_config(str(tmp_path / "fm.yaml")).expert.model == {"model": "fm", "embed_dim": 8}
    assert C.load_config(None, ["expert.model={model: fm}"]).expert.model == {"model": "fm"}
    assert C.load_config(None, ["expert.model.embed_dim=4"]).expert.model == {"model": "dnn", "embed_dim": 4, "hidden": [64, 32]}
