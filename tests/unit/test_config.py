"""Config: defaults, YAML + dotted overrides, type checks, derived sizes, validation, presets."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from raylm.config import (
    PRESET_TOKENIZER_VOCAB,
    MODEL_PRESETS,
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    from_dict,
    load_config,
    load_yaml,
    to_dict,
)
from raylm.model import count_params


def _write(tmp_path, text: str, name: str = "run.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# --------------------------------------------------------------------------- defaults / loading


def test_defaults_validate():
    cfg = Config()
    assert cfg.validate() is cfg
    assert load_config() == cfg
    assert cfg.model == MODEL_PRESETS["tiny"]


def test_yaml_then_overrides_precedence(tmp_path):
    path = _write(tmp_path, "name: fromyaml\nseed: 7\ntrain:\n  lr: 0.01\n  max_steps: 50\n")
    cfg = load_config(path, ["train.lr=0.02", "seed=9"])
    assert cfg.name == "fromyaml"  # yaml beats default
    assert cfg.train.max_steps == 50  # yaml beats default
    assert cfg.train.lr == 0.02  # override beats yaml
    assert cfg.seed == 9  # override beats yaml
    assert cfg.train.warmup_steps == TrainConfig().warmup_steps  # untouched default


def test_base_mapping_is_below_yaml(tmp_path):
    path = _write(tmp_path, "seed: 5\n")
    cfg = load_config(path, [], base={"seed": 3, "name": "base"})
    assert cfg.seed == 5 and cfg.name == "base"


def test_preset_override_then_other_overrides_on_top():
    cfg = load_config(None, ["model.preset=gpt2-124m", "model.n_layers=2", "data.seq_len=128"])
    expected = replace(MODEL_PRESETS["gpt2-124m"], n_layers=2)
    assert cfg.model == expected
    assert cfg.data.seq_len == 128


def test_preset_in_yaml_with_field_override(tmp_path):
    path = _write(tmp_path, "model:\n  preset: '1b'\n")
    cfg = load_config(path, ["model.dim=1024"])
    assert cfg.model == replace(MODEL_PRESETS["1b"], dim=1024)


def test_unknown_preset_names_key():
    with pytest.raises(ConfigError, match=r"model\.preset='nope'"):
        load_config(None, ["model.preset=nope"])


@pytest.mark.parametrize("override,key", [
    ("bogus=1", "'bogus'"),
    ("train.lrr=0.1", "'train.lrr'"),
    ("model.dims=64", "'model.dims'"),
    ("data.txt_field=x", "'data.txt_field'"),
    ("s3.endpoint=x", "'s3.endpoint'"),
])
def test_unknown_keys_raise_naming_dotted_key(override, key):
    with pytest.raises(ConfigError, match="unknown config key " + key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml_file(tmp_path):
    path = _write(tmp_path, "train:\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match=r"'train\.micro_batch'"):
        load_config(path)


@pytest.mark.parametrize("override,key", [
    ("train.max_steps=abc", "train.max_steps"),  # str for int
    ("train.max_steps=10.0", "train.max_steps"),  # float for int
    ("train.max_steps=10.5", "train.max_steps"),
    ("train.max_steps=true", "train.max_steps"),  # bool for int
    ("seed=false", "seed"),
    ("train.lr=true", "train.lr"),  # bool for float
    ("train.use_gpu=1", "train.use_gpu"),  # int for bool
    ("train.lr=fast", "train.lr"),  # unparsable float
    ("model.n_kv_heads=two", "model.n_kv_heads"),  # int | None
    ("seed=[1, 2]", "seed"),
    ("model=3", "model"),  # a section given a scalar
])
def test_wrong_types_raise_naming_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value) and "expected" in str(e.value)  # a type error, not a later check


def test_float_parsing_and_int_widening():
    cfg = load_config(None, ["train.lr=3e-4", "train.min_lr_ratio=1", "name=123"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr_ratio == 1.0 and isinstance(cfg.train.min_lr_ratio, float)
    assert cfg.name == "123"


def test_yaml_file_float_without_dot(tmp_path):
    # YAML 1.1 reads 3e-4 (no dot) as a string; it must still become a float.
    cfg = load_config(_write(tmp_path, "train:\n  lr: 3e-4\n"))
    assert cfg.train.lr == pytest.approx(3e-4)


def test_optional_field_accepts_null_and_int():
    assert load_config(None, ["model.n_kv_heads=null"]).model.n_kv_heads is None
    assert load_config(None, ["model.n_kv_heads=2"]).model.n_kv_heads == 2


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr"])


def test_invalid_yaml_names_file(tmp_path):
    path = _write(tmp_path, "train: [unclosed\n", "broken.yaml")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(path)


def test_missing_file_names_file(tmp_path):
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="absent.yaml.*not found"):
        load_config(path)


def test_non_mapping_top_level_names_file(tmp_path):
    path = _write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_config(path)


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()


# --------------------------------------------------------------------------- derived values


def test_head_dim_and_kv_heads():
    m = ModelConfig(vocab_size=64, dim=96, n_heads=6)
    assert m.head_dim == 16 and m.kv_heads == 6
    assert replace(m, n_kv_heads=2).kv_heads == 2


@pytest.mark.parametrize("dim,multiple,expected", [
    (256, 64, 704),  # 8/3*256 = 682.7 -> 704
    (768, 64, 2048),  # exactly 2048
    (192, 64, 512),
    (100, 32, 288),  # 266.7 -> 288
])
def test_hidden_dim_rounds_up_to_multiple(dim, multiple, expected):
    m = ModelConfig(dim=dim, n_heads=2 if dim % 4 else 4, ffn_multiple_of=multiple)
    assert m.hidden_dim == expected
    assert m.hidden_dim % multiple == 0


def test_explicit_ffn_dim_wins():
    assert ModelConfig(dim=256, ffn_dim=1000).hidden_dim == 1000


def test_with_vocab_rounds_to_64():
    m = ModelConfig()
    assert m.with_vocab(4096).vocab_size == 4096
    assert m.with_vocab(4097).vocab_size == 4160
    assert m.with_vocab(1).vocab_size == 64
    assert m.vocab_size == 0  # frozen: a new config is returned


def test_with_vocab_keeps_the_tokenizer_size_or_its_rounding_only():
    assert ModelConfig(vocab_size=4096).with_vocab(4096).vocab_size == 4096
    assert ModelConfig(vocab_size=4160).with_vocab(4100).vocab_size == 4160  # 4100 rounded up to 64
    with pytest.raises(ConfigError, match="5000.*4096"):  # 904 rows no id would ever use
        ModelConfig(vocab_size=5000).with_vocab(4096)


def test_with_vocab_rejects_too_small():
    with pytest.raises(ConfigError, match="vocab_size=1000.*4096"):
        ModelConfig(vocab_size=1000).with_vocab(4096)


# --------------------------------------------------------------------------- validation


def test_dim_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"model\.dim=100.*model\.n_heads=3"):
        load_config(None, ["model.dim=100", "model.n_heads=3", "model.n_kv_heads=null"])


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(ConfigError, match=r"n_heads=6.*n_kv_heads=4"):
        load_config(None, ["model.n_heads=6", "model.dim=192", "model.n_kv_heads=4"])


def test_odd_head_dim_rejected():
    with pytest.raises(ConfigError, match="even"):
        ModelConfig(dim=18, n_heads=2).validate()


def test_seq_len_exceeds_max_seq_len():
    with pytest.raises(ConfigError, match=r"data\.seq_len=512.*max_seq_len=256"):
        load_config(None, ["data.seq_len=512"])
    assert load_config(None, ["data.seq_len=512", "model.max_seq_len=512"]).data.seq_len == 512


def test_global_batch_not_multiple_of_micro_batch():
    with pytest.raises(ConfigError, match=r"global_batch_size=30.*micro_batch_size \* train.num_workers = 16 \* 2"):
        load_config(None, ["train.global_batch_size=30", "train.num_workers=2"])
    # "auto" workers: the micro-batch is checked when the config loads, the workers once known.
    with pytest.raises(ConfigError, match=r"^train\.global_batch_size=30 is not a multiple of train\.micro_batch_size=16$"):
        load_config(None, ["train.global_batch_size=30"])
    # Divisible by the micro-batch but not by micro-batch x workers: 8 workers cannot share 32.
    with pytest.raises(ConfigError, match=r"global_batch_size=32.*= 16 \* 8"):
        load_config(None, ["train.num_workers=8"])


def test_bad_precision_and_name():
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="name"):
        load_config(None, ["name=a/b"])


@pytest.mark.parametrize("override", ["name=.", "name=..", "name=lr*2", "name=exp?1", "storage=/tmp/runs*",
                                      "storage="])
def test_run_paths_that_listing_cannot_read_back_are_refused(override):
    """'..' put the run outside storage, '.' made storage the run; a wildcard in the run's path
    made listing its own checkpoint read a pattern: the run trained, then failed to commit; an
    empty storage put runs at the filesystem's root."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}="):
        load_config(None, [override])


def test_to_dict_from_dict_round_trip():
    cfg = load_config(None, ["model.preset=gpt2-124m", "train.lr=1e-3", "sample.prompts=[a, b]",
                             "model.n_kv_heads=4", "data.seq_len=512"])
    d = to_dict(cfg)
    assert d["sample"]["prompts"] == ["a", "b"]  # tuples become lists for YAML/JSON
    assert isinstance(d["model"], dict)
    back = from_dict(d)
    assert back == cfg
    assert isinstance(back.sample.prompts, tuple)


def test_from_dict_rejects_unknown_key():
    d = to_dict(Config())
    d["train"]["nonsense"] = 1
    with pytest.raises(ConfigError, match=r"'train\.nonsense'"):
        from_dict(d)


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_validates(name):
    m = MODEL_PRESETS[name]
    m.validate()
    resolved = m.with_vocab(4096)
    assert resolved.vocab_size >= 4096
    assert count_params(resolved) > count_params(resolved, non_embedding=True) > 0
    cfg = load_config(None, [f"model.preset={name}"])
    assert cfg.model == m


def test_gpt2_124m_param_count():
    m = MODEL_PRESETS["gpt2-124m"].with_vocab(PRESET_TOKENIZER_VOCAB["gpt2-124m"])
    assert count_params(m) == pytest.approx(124e6, rel=0.02)
    assert count_params(m, non_embedding=True) == pytest.approx(85e6, rel=0.02)


def test_gpt2_124m_shape_with_llama_mlp_width_is_124m():
    # The published GPT-2 small size, reached with the SwiGLU width that keeps a 4*dim MLP's count.
    m = replace(MODEL_PRESETS["gpt2-124m"].with_vocab(PRESET_TOKENIZER_VOCAB["gpt2-124m"]), ffn_dim=None)
    assert m.hidden_dim == 2048
    assert count_params(m) == pytest.approx(124e6, rel=0.01)
    assert count_params(m, non_embedding=True) == pytest.approx(85e6, rel=0.01)


def test_7b_param_count():
    n = count_params(MODEL_PRESETS["7b"].with_vocab(PRESET_TOKENIZER_VOCAB["7b"]))
    assert 6.7e9 <= n <= 7.3e9


# --------------------------------------------------------------------------- override values


@pytest.mark.parametrize("raw", ["*.jsonl", "*foo", "s3://b/*.txt", "[a].txt", "{a.txt", "a\tb.txt", "@x"])
def test_override_that_is_not_yaml_is_the_literal_string(raw):
    assert load_config(None, [f"data.path={raw}"]).data.path == raw


def test_override_that_is_not_yaml_fails_the_type_check_of_a_number():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lr=*.jsonl"])
    assert str(e.value) == "train.lr='*.jsonl': expected float, got str"


@pytest.mark.parametrize("override,key", [
    ('train.lr=!!python/object/apply:os.system ["echo hi"]', "train.lr"),
    ("data.path=!!python/name:os.system", "data.path"),
    ("data.path=!x", "data.path"),
    ("name= !!str run", "name"),
    ("sample.prompts=[a, !!str b]", "sample.prompts"),  # inside a value, too
    ("seed=!!int 3", "seed"),
])
def test_override_with_a_yaml_tag_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(key + "=") and "YAML tags are not accepted" in msg and "\n" not in msg


def test_quoted_exclamation_mark_is_text():
    assert load_config(None, ["data.path='!x.txt'", "name=hi!"]).data.path == "!x.txt"


@pytest.mark.parametrize("path", ["*.jsonl", "[a].txt", "a: b.txt", "'x y.txt'", "true", "null", "!x", "3e-4",
                                  "s3://b/{a,b}/*.gz"])
def test_cli_data_option_is_never_parsed_as_yaml(path):
    from raylm import cli

    args = cli.build_parser().parse_args(["pretrain", "--data", path, "train.lr=1e-3"])
    cfg = cli._config(args)
    assert cfg.data.path == path and cfg.train.lr == 1e-3


def test_key_value_pair_override_is_taken_as_given():
    cfg = load_config(None, [("data.path", "a: b"), ("train.max_steps", 7)])
    assert cfg.data.path == "a: b" and cfg.train.max_steps == 7
    with pytest.raises(ConfigError, match=r"^train\.max_steps='7': expected int"):
        load_config(None, [("train.max_steps", "7")])  # not parsed, so still a string


@pytest.mark.parametrize("override", ["model.preset=[a]", "model.preset={a: 1}"])
def test_unhashable_preset_names_key(override):
    with pytest.raises(ConfigError, match=r"^model\.preset=.*unknown"):
        load_config(None, [override])


# --------------------------------------------------------------------------- YAML files


@pytest.mark.parametrize("text,problem", [
    ('train: !!python/object/apply:os.system ["echo hi"]\n', "line 1: could not determine a constructor"),
    ("seed: !custom 3\n", "line 1: could not determine a constructor for the tag '!custom'"),
    ("data:\n  path: *.jsonl\n", "line 2: expected alphabetic or numeric character"),
    ("data:\n  path: *undefined\n", "line 2: found undefined alias 'undefined'"),
    # A section written twice: PyYAML would keep the second and drop train.lr without a word.
    ("train:\n  lr: 0.5\nmodel:\n  preset: tiny\ntrain:\n  max_steps: 3\n", "line 5: duplicate key 'train'"),
    ("train:\n  lr: 0.5\n  lr: 0.1\n", "line 3: duplicate key 'lr'"),
])
def test_yaml_file_with_tag_or_bad_alias_is_one_line_naming_file(tmp_path, text, problem):
    path = _write(tmp_path, text, "tagged.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"config file {path}: not valid YAML (") and problem in msg and "\n" not in msg


def test_yaml_file_anchors_and_aliases_work(tmp_path):
    path = _write(tmp_path, "train:\n  lr: &x 0.5\n  min_lr_ratio: *x\n")
    cfg = load_config(path)
    assert cfg.train.lr == cfg.train.min_lr_ratio == 0.5
    path = _write(tmp_path, "base: &b {lr: 0.5, max_steps: 9}\ntrain:\n  <<: *b\n  lr: 0.1\n", "merge.yaml")
    data = load_yaml(open(path).read())
    assert data["train"] == {"lr": 0.1, "max_steps": 9}  # a merge's key overridden: not a duplicate
    # The same where an alias is built before its anchor's own merge (PyYAML writes merged keys
    # into the anchored node, so a check of the constructed mapping would see `x` twice).
    data = load_yaml("outer:\n  inner: &b\n    <<: {x: 1}\n    x: 2\nuse: {<<: *b}\n")
    assert data["use"] == data["outer"]["inner"] == {"x": 2}


def test_yaml_file_alias_bomb_gives_a_short_error(tmp_path):
    # Nine levels of ten aliases: a 400-byte file whose value would print as gigabytes.
    levels = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = _write(tmp_path, f"seed: [{', '.join(levels)}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith("seed=[") and len(str(e.value)) < 5000


def test_recursive_alias_in_yaml_file(tmp_path):
    path = _write(tmp_path, "train: &t\n  lr: *t\n")
    with pytest.raises(ConfigError, match=r"^train\.lr=.*expected float, got dict"):
        load_config(path)


def test_binary_config_file_names_file(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"\x80\x02\xff\xfe")
    with pytest.raises(ConfigError, match=r"model\.pt: not UTF-8 text"):
        load_config(str(p))


def test_auto_workers_resolve_per_cluster():
    """"auto": one worker per machine holding its cores on CPU (less a spare core where the
    machine declares no CPUs beyond them), one per GPU with use_gpu; explicit values stay."""
    tc = load_config().train
    assert (tc.num_workers, tc.cpus_per_worker) == ("auto", "auto")
    assert (lambda r: (r.num_workers, r.cpus_per_worker))(tc.resolve_workers(2)) == (1, 2.0)
    assert (lambda r: (r.num_workers, r.cpus_per_worker))(tc.resolve_workers(8, machines=2, spare=1)) == (2, 7.0)
    assert (lambda r: (r.num_workers, r.cpus_per_worker))(tc.resolve_workers(2, share=2)) == (1, 1.0)  # Tune trials
    two = load_config(overrides=["train.num_workers=2"]).train.resolve_workers(2)
    assert (two.num_workers, two.cpus_per_worker) == (2, 1.0)  # the cores shared among the workers
    gpu = load_config(overrides=["train.use_gpu=true", "train.micro_batch_size=4"]).train.resolve_workers(16, gpus=8)
    assert (gpu.num_workers, gpu.cpus_per_worker) == (8, 1.0)
    fixed = load_config(overrides=["train.num_workers=2", "train.cpus_per_worker=3"]).train
    assert fixed.resolve_workers(64) is fixed
    # The batch must split over the workers "auto" found: named as when the count is given.
    with pytest.raises(ConfigError, match=r"global_batch_size=32.*= 16 \* 8"):
        load_config(overrides=["train.use_gpu=true"]).train.resolve_workers(16, gpus=8)
    with pytest.raises(ConfigError, match=r"^train\.num_workers='four': expected a number or auto$"):
        load_config(overrides=["train.num_workers=four"])


def test_a_generation_budget_of_the_whole_context_is_refused_at_load():
    """In-training generation tasks then had no room for a prompt, and the run failed at its
    first evaluation."""
    with pytest.raises(ConfigError, match=r"^eval\.max_new_tokens=64 leaves no room"):
        load_config(None, ["eval.gen_tasks=[a.jsonl]", "eval.max_new_tokens=64", "model.max_seq_len=64",
                           "data.seq_len=64"])
    load_config(None, ["eval.gen_tasks=[a.jsonl]", "eval.max_new_tokens=63", "model.max_seq_len=64", "data.seq_len=64"])


@pytest.mark.parametrize("key", ["storage", "data.path", "data.val_path", "tokenizer.path", "init_from"])
def test_a_placeholder_left_in_a_path_is_refused_naming_the_key(key):
    """Examples write s3://<bucket>/...; left in, it failed only when its stage read it."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}='s3://<bucket>/x': <bucket> is a placeholder"):
        load_config(overrides=[f"{key}=s3://<bucket>/x"])


def test_only_an_examples_bucket_counts_as_a_placeholder(tmp_path):
    """`<...>` may be part of a real local path or S3 key; an S3 bucket's name never holds one."""
    assert load_config(overrides=[f"data.path={tmp_path}/<lang>.txt", "init_from=s3://b/runs/<v2>/x"])
    with pytest.raises(ConfigError, match=r"^storage='s3://<my-bucket>/r': <my-bucket> is a placeholder"):
        load_config(overrides=["storage=s3://<my-bucket>/r"])


def test_overrides_may_come_as_an_iterator_with_a_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: fromfile\n")
    assert load_config(str(path), iter(["name=override"])).name == "override"
