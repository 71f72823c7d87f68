from __future__ import annotations

from pathlib import Path

import pytest

from llamaproc import ConfigError
from llamaproc.errors import InvalidArgumentError, LlamaprocError
from llamaproc.runtime import (
    ModelConfig,
    ServeConfig,
    load_config,
    parse_api_keys,
    parse_duration,
    parse_size,
    shard_options,
)


def write(tmp_path: Path, text: str, *, model: str = "tiny.gguf") -> Path:
    if model:
        (tmp_path / model).write_bytes(b"GGUF")
    config = tmp_path / "serve.toml"
    config.write_text(text)
    return config


def load_error(config: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(config)
    return info.value


MINIMAL = """
[models.tiny]
path = "tiny.gguf"
"""


def test_full_file(tmp_path: Path) -> None:
    (tmp_path / "llama-server").write_text("")
    config = write(
        tmp_path,
        f"""
max_loaded_models = 2
memory_budget = "8GiB"
idle_timeout = "5m"
queue_size = 4
preload = ["tiny"]
drain_timeout = "10s"
restart_backoff = "1s"
restart_backoff_max = "1m"
max_restarts = 3
restart_window = "1h30m"
api_keys = ["key-one", "key-two"]
allowed_hosts = ["LLM.Example.com", "::1", "10.0.0.5"]
allowed_origins = ["https://App.Example.com:443", "http://localhost:3000", "*"]
header_timeout = "5s"
body_timeout = "1m"
max_connections = 64

[models.tiny]
path = "{tmp_path / "tiny.gguf"}"
parallel = 2
ctx_size = 2048
gpu_layers = 99
threads = 2
embeddings = true
args = ["--flash-attn", "on"]
env = {{ FOO = "bar" }}
binary = "./llama-server"
""",
    )
    cfg = load_config(config)
    assert cfg.max_loaded_models == 2
    assert cfg.memory_budget == 8 * 2**30
    assert cfg.idle_timeout == 300.0
    assert cfg.queue_size == 4
    assert cfg.preload == ("tiny",)
    assert cfg.drain_timeout == 10.0
    assert cfg.restart_backoff == 1.0
    assert cfg.restart_backoff_max == 60.0
    assert cfg.max_restarts == 3
    assert cfg.restart_window == 5400.0
    assert [key.get_secret_value() for key in cfg.api_keys] == ["key-one", "key-two"]
    assert cfg.allowed_hosts == ("llm.example.com", "[::1]", "10.0.0.5")
    assert cfg.allowed_origins == ("https://app.example.com", "http://localhost:3000", "*")
    assert cfg.header_timeout == 5.0
    assert cfg.body_timeout == 60.0
    assert cfg.max_connections == 64
    tiny = cfg.models["tiny"]
    assert tiny == ModelConfig(
        path=tmp_path / "tiny.gguf",
        parallel=2,
        ctx_size=2048,
        gpu_layers=99,
        threads=2,
        embeddings=True,
        args=("--flash-attn", "on"),
        env={"FOO": "bar"},
        binary=str(tmp_path / "llama-server"),
    )


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.max_loaded_models == 1
    assert cfg.memory_budget is None
    assert cfg.idle_timeout is None
    assert cfg.queue_size == 16
    assert cfg.preload == ()
    assert cfg.drain_timeout == 30.0
    assert cfg.restart_backoff == 0.5
    assert cfg.restart_backoff_max == 30.0
    assert cfg.max_restarts == 5
    assert cfg.restart_window == 60.0
    assert (cfg.api_keys, cfg.allowed_hosts, cfg.allowed_origins) == ((), (), ())
    assert (cfg.header_timeout, cfg.body_timeout, cfg.max_connections) == (10.0, 30.0, 1024)
    tiny = cfg.models["tiny"]
    assert tiny.parallel == 1
    assert (tiny.ctx_size, tiny.gpu_layers, tiny.threads, tiny.binary) == (None, None, None, None)
    assert tiny.embeddings is False
    assert tiny.args == ()
    assert tiny.env == {}


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(ValueError, match="frozen"):
        cfg.queue_size = 3  # type: ignore[misc, unused-ignore]


def test_relative_paths_resolve_against_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir("/")
    config = write(
        tmp_path,
        '[models.tiny]\npath = "models/../models/tiny.gguf"\nbinary = "bin/llama-server"\n'
        '[models.other]\npath = "models/tiny.gguf"\nbinary = "llama-server"\n',
        model="",
    )
    cfg = load_config(config)
    assert cfg.models["tiny"].path == tmp_path / "models" / "tiny.gguf"
    assert cfg.models["tiny"].binary == str(tmp_path / "bin" / "llama-server")
    assert cfg.models["other"].binary == "llama-server"  # bare names are left for a PATH search


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = write(tmp_path, '[models.tiny]\npath = "~/tiny.gguf"\n')
    assert load_config(config).models["tiny"].path == tmp_path / "tiny.gguf"


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "max_loaded_model = 2\n" + MINIMAL))
    assert str(err) == f"{tmp_path / 'serve.toml'}: unknown key 'max_loaded_model' (did you mean 'max_loaded_models'?)"
    assert isinstance(err, LlamaprocError)
    assert err.path == tmp_path / "serve.toml"


def test_unknown_model_key_names_its_table(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, MINIMAL + "paralel = 2\n"))
    assert str(err).endswith(": models.tiny: unknown key 'paralel' (did you mean 'parallel'?)")


def test_unknown_key_without_close_match(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "zzzz = 1\n" + MINIMAL))
    assert str(err).endswith(": unknown key 'zzzz'")


def test_parallel_zero(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, MINIMAL + "parallel = 0\n"))
    assert str(err) == f"{tmp_path / 'serve.toml'}: models.tiny.parallel: Input should be greater than or equal to 1"


def test_bad_duration(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, 'idle_timeout = "5 minutes"\n' + MINIMAL))
    assert str(err).endswith(
        ": idle_timeout: invalid duration '5 minutes': expected e.g. '300ms', '30s', '5m', '1h30m' or 'never'"
    )


def test_required_duration_cannot_be_disabled(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "restart_backoff = 0\n" + MINIMAL))
    assert str(err).endswith(": restart_backoff: invalid duration 0: must be greater than zero")


def test_bad_size(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, 'memory_budget = "8 gigs"\n' + MINIMAL))
    assert str(err).endswith(
        ": memory_budget: invalid size '8 gigs': expected e.g. '8GiB', '512MiB', '1.5GB' or a number of bytes"
    )


def test_missing_model_path(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, '[models.big]\npath = "big.gguf"\n', model=""))
    assert str(err).endswith(f": models.big.path: model file not found: {tmp_path / 'big.gguf'}")


def test_model_path_is_a_directory(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, '[models.big]\npath = "."\n', model=""))
    assert str(err).endswith(f": models.big.path: model path is not a file: {tmp_path}")


def test_preload_unknown_model(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, 'preload = ["tinny"]\n' + MINIMAL))
    assert str(err).endswith(": preload: unknown model 'tinny' (did you mean 'tiny'?)")


def test_bad_model_name(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, '[models."-bad name"]\npath = "tiny.gguf"\n'))
    assert str(err).endswith(
        ": models.\"-bad name\": invalid model name '-bad name': must start with a letter or digit"
        " and contain only letters, digits, '.', '_', ':' or '-'"
    )


def test_model_names_allow_dots_colons_dashes(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[models."qwen2.5:7b-q4_K"]\npath = "tiny.gguf"\n'))
    assert list(cfg.models) == ["qwen2.5:7b-q4_K"]


def test_no_models(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "max_loaded_models = 1\n"))
    assert str(err).endswith(": models: Field required")


def test_wrong_types_are_not_coerced(tmp_path: Path) -> None:
    text = 'max_loaded_models = "2"\n' + MINIMAL + 'embeddings = "yes"\nargs = ["-c", 2048]\n'
    err = load_error(write(tmp_path, text))
    assert err.problems == (
        f"{tmp_path / 'serve.toml'}: max_loaded_models: Input should be a valid integer",
        f"{tmp_path / 'serve.toml'}: models.tiny.embeddings: Input should be a valid boolean",
        f"{tmp_path / 'serve.toml'}: models.tiny.args[1]: Input should be a valid string",
    )


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, 'queue_size = -1\nidle_timeout = "soon"\n' + MINIMAL + "parallel = 0\n"))
    assert [line.split(": ", 1)[1] for line in str(err).splitlines()] == [
        "idle_timeout: invalid duration 'soon': expected e.g. '300ms', '30s', '5m', '1h30m' or 'never'",
        "queue_size: Input should be greater than or equal to 0",
        "models.tiny.parallel: Input should be greater than or equal to 1",
    ]
    assert len(err.problems) == 3


def test_backoff_max_below_initial(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, 'restart_backoff = "10s"\nrestart_backoff_max = "2s"\n' + MINIMAL))
    assert str(err).endswith(": restart_backoff_max (2s) must not be less than restart_backoff (10s)")


def test_bad_toml_reports_line_and_column(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "queue_size = 1\nmax_loaded_models = = 2\n"))
    assert str(err) == f"{tmp_path / 'serve.toml'}:2:21: invalid TOML: Invalid value"


def test_missing_file(tmp_path: Path) -> None:
    err = load_error(tmp_path / "nope.toml")
    assert str(err) == f"{tmp_path / 'nope.toml'}: config file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    err = load_error(tmp_path)
    assert str(err).startswith(f"{tmp_path}: cannot read config file: ")


def test_serve_config_without_load_config_skips_file_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = ServeConfig.model_validate({"models": {"x": {"path": "absent.gguf"}}})
    assert cfg.models["x"].path == tmp_path / "absent.gguf"


def test_api_keys_are_never_shown(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, 'api_keys = ["very-secret-key"]\n' + MINIMAL))
    assert "very-secret-key" not in repr(cfg)
    assert "very-secret-key" not in str(cfg)
    assert "very-secret-key" not in cfg.model_dump_json()
    err = load_error(write(tmp_path, 'api_keys = ["fine-key", "very secret key"]\n' + MINIMAL))
    assert str(err).endswith(
        ": api_keys[1]: invalid API key: must be non-empty and contain only visible ASCII characters"
        " (no spaces or commas)"
    )
    assert "secret" not in str(err)


def test_bad_api_keys(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, 'api_keys = ["", "a,b", 5]\n' + MINIMAL))
    assert [line.split(": ", 1)[1] for line in err.problems] == [
        "api_keys[0]: invalid API key: must be non-empty and contain only visible ASCII characters (no spaces or commas)",
        "api_keys[1]: invalid API key: must be non-empty and contain only visible ASCII characters (no spaces or commas)",
        "api_keys[2]: Input should be a valid string",
    ]
    err = load_error(write(tmp_path, 'api_keys = "one-key"\n' + MINIMAL))
    assert str(err).endswith(": api_keys: Input should be a valid tuple")


def test_parse_api_keys() -> None:
    keys = parse_api_keys(" key-one, key-two,, ")
    assert [k.get_secret_value() for k in keys] == ["key-one", "key-two"]
    assert parse_api_keys("") == ()
    with pytest.raises(ConfigError, match=r"^key 2: invalid API key: ") as info:
        parse_api_keys("key-one,bad\tkey")
    assert "bad" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'allowed_hosts = ["llm.example.com:8484"]',
            "allowed_hosts[0]: invalid host 'llm.example.com:8484': expected a host name or an IP address"
            " without a port (any port is accepted), e.g. 'llm.example.com', or '*'",
        ),
        (
            'allowed_hosts = ["http://llm.example.com"]',
            "allowed_hosts[0]: invalid host 'http://llm.example.com': expected a host name or an IP address,"
            " e.g. 'llm.example.com', or '*'",
        ),
        (
            'allowed_origins = ["https://app.example.com/"]',
            "allowed_origins[0]: invalid origin 'https://app.example.com/': expected 'scheme://host[:port]'"
            " (http or https, no path), e.g. 'https://app.example.com', or '*'",
        ),
        (
            'allowed_origins = ["app.example.com"]',
            "allowed_origins[0]: invalid origin 'app.example.com': expected 'scheme://host[:port]'"
            " (http or https, no path), e.g. 'https://app.example.com', or '*'",
        ),
        (
            'allowed_origins = ["http://app.example.com:70000"]',
            "allowed_origins[0]: invalid origin 'http://app.example.com:70000': expected 'scheme://host[:port]'"
            " (http or https, no path), e.g. 'https://app.example.com', or '*'",
        ),
        ('header_timeout = "never"', "header_timeout: invalid duration 'never': must be greater than zero"),
        ("body_timeout = 0", "body_timeout: invalid duration 0: must be greater than zero"),
        ("max_connections = 0", "max_connections: Input should be greater than or equal to 1"),
        ('max_connections = "many"', "max_connections: Input should be a valid integer"),
        ("allowed_origin = []", "unknown key 'allowed_origin' (did you mean 'allowed_origins'?)"),
        ("api_key = []", "unknown key 'api_key' (did you mean 'api_keys'?)"),
        ("header_timout = 1", "unknown key 'header_timout' (did you mean 'header_timeout'?)"),
    ],
)
def test_bad_http_settings(tmp_path: Path, text: str, message: str) -> None:
    err = load_error(write(tmp_path, text + "\n" + MINIMAL))
    assert str(err) == f"{tmp_path / 'serve.toml'}: {message}"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300ms", 0.3),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m 15s", 5415.0),
        ("1.5s", 1.5),
        ("45", 45.0),
        (90, 90.0),
        (0.25, 0.25),
        ("0", None),
        (0, None),
        ("0s", None),
        ("never", None),
        ("NEVER", None),
    ],
)
def test_parse_duration(text: str | float, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "-1s", "30m1h", "5m5m", -1, float("inf"), float("nan"), True])
def test_parse_duration_rejects(text: str | float) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        ("1024", 1024),
        ("512MiB", 512 * 2**20),
        ("8GiB", 8 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("100MB", 100_000_000),
        ("100 mb", 100_000_000),
        ("2KiB", 2048),
        ("3kB", 3000),
        ("1TiB", 2**40),
        ("10B", 10),
        ("1.1KiB", 1126),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5K", "1.5 gigs", "-1", -1, 1.5, True])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ConfigError, match="invalid size"):
        parse_size(text)


# --- sharded models -------------------------------------------------------------------------------


def sharded(tmp_path: Path, text: str) -> ConfigError:
    return load_error(write(tmp_path, MINIMAL + text))


def test_a_model_without_worker_keys_is_not_sharded(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    model = cfg.models["tiny"]
    assert not model.sharded
    assert (model.workers, model.local_workers, model.split, model.min_workers, model.max_reshards) == (None,) * 5
    assert cfg.max_reshards == 3
    assert shard_options(cfg, "tiny") == {}


def test_sharded_model_keys(tmp_path: Path) -> None:
    text = 'workers = ["10.0.0.2:50052", "[::1]:50053", "Worker-1.lan:7"]\nsplit = [3, 1.5, 0]\n'
    text += 'min_workers = 2\nmax_reshards = 0\nstall_timeout = "10s"\n'
    cfg = load_config(write(tmp_path, "max_reshards = 5\n" + MINIMAL + text))
    model = cfg.models["tiny"]
    assert model.sharded and model.worker_count == 3
    assert model.workers == ("10.0.0.2:50052", "[::1]:50053", "Worker-1.lan:7")
    assert model.split == (3.0, 1.5, 0.0)
    assert shard_options(cfg, "tiny") == {
        "workers": ["10.0.0.2:50052", "[::1]:50053", "Worker-1.lan:7"],
        "split": [3.0, 1.5, 0.0],
        "min_workers": 2,
        "max_reshards": 0,
        "stall_timeout": 10.0,
    }


def test_sharded_defaults_come_from_the_daemon(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, 'max_reshards = 5\nstall_timeout = "never"\n' + MINIMAL + "local_workers = 2\n"))
    assert cfg.models["tiny"].sharded and cfg.models["tiny"].worker_count == 2
    assert shard_options(cfg, "tiny", workers=["127.0.0.1:1", "127.0.0.1:2"]) == {
        "workers": ["127.0.0.1:1", "127.0.0.1:2"],
        "split": "capacity",
        "min_workers": 1,
        "max_reshards": 5,
        "stall_timeout": None,
    }


def test_a_model_own_never_stall_timeout_is_no_limit(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + 'workers = ["a:1"]\nstall_timeout = "never"\nsplit = "uniform"\n'))
    options = shard_options(cfg, "tiny")
    assert options["stall_timeout"] is None and options["split"] == "uniform"


@pytest.mark.parametrize("text", ['workers = "registered"\n', "local_workers = 1\n"])
def test_workers_resolved_by_the_daemon_must_be_given(tmp_path: Path, text: str) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + text))
    assert cfg.models["tiny"].sharded and cfg.models["tiny"].worker_count == (1 if "local" in text else None)
    with pytest.raises(InvalidArgumentError, match="pass the addresses of its workers") as info:
        shard_options(cfg, "tiny")
    assert info.value.param == "workers"


def test_a_split_that_does_not_fit_the_resolved_workers(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + 'workers = "registered"\nsplit = [1, 2]\n'))
    assert shard_options(cfg, "tiny", workers=["a:1", "b:2"])["split"] == [1.0, 2.0]
    with pytest.raises(InvalidArgumentError, match="2 weights for 3 workers") as info:
        shard_options(cfg, "tiny", workers=["a:1", "b:2", "c:3"])
    assert info.value.param == "split"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('workers = ["a:1", "b"]\n', "models.tiny.workers[1]: invalid worker address 'b': expected 'host:port'"),
        ('workers = ["a:0"]\n', "models.tiny.workers[0]: invalid worker address 'a:0'"),
        ('workers = ["a:65536"]\n', "models.tiny.workers[0]: invalid worker address 'a:65536'"),
        ('workers = ["::1:5"]\n', "models.tiny.workers[0]: invalid worker address '::1:5'"),
        ('workers = ["[nope]:5"]\n', "models.tiny.workers[0]: invalid worker address '[nope]:5'"),
        ('workers = ["a b:5"]\n', "models.tiny.workers[0]: invalid worker address 'a b:5'"),
        ("workers = [5]\n", "models.tiny.workers[0]: Input should be a valid string"),
        ('workers = "all"\n', "models.tiny.workers: invalid workers 'all': expected a list of 'host:port' addresses"),
        ("workers = 2\n", "models.tiny.workers: invalid workers: expected a list"),
        ('workers = ["A:1", "a:1"]\n', "models.tiny.workers: worker 'a:1' is listed twice (as 'A:1' before)"),
        ('workers = ["[::1]:1", "[0::1]:1"]\n', "models.tiny.workers: worker '[0::1]:1' is listed twice"),
        ("local_workers = -1\n", "models.tiny.local_workers: Input should be greater than or equal to 0"),
        ('workers = ["a:1"]\nlocal_workers = 1\n', "models.tiny.local_workers: workers and local_workers exclude"),
        ('split = "uniform"\n', "models.tiny.split: split is only for a sharded model: set workers or local_workers"),
        ("min_workers = 1\n", "models.tiny.min_workers: min_workers is only for a sharded model"),
        ("max_reshards = 1\n", "models.tiny.max_reshards: max_reshards is only for a sharded model"),
        ('local_workers = 2\nsplit = "even"\n', "models.tiny.split: invalid split 'even': expected 'capacity',"),
        ("local_workers = 2\nsplit = 2\n", "models.tiny.split: invalid split: expected"),
        ("local_workers = 2\nsplit = [1, -1]\n", "models.tiny.split[1]: invalid weight -1: must be a finite number"),
        ('local_workers = 2\nsplit = [1, "1"]\n', "models.tiny.split[1]: Input should be a number"),
        ("local_workers = 2\nsplit = [1, true]\n", "models.tiny.split[1]: Input should be a number"),
        ("local_workers = 2\nsplit = [1, nan]\n", "models.tiny.split[1]: invalid weight nan"),
        ("local_workers = 2\nsplit = [0, 0.0]\n", "models.tiny.split: the weights of split must not all be zero"),
        ("local_workers = 2\nsplit = [1, 2, 3]\n", "models.tiny.split: split has 3 weights for 2 workers"),
        ('workers = ["a:1"]\nsplit = [1, 2]\n', "models.tiny.split: split has 2 weights for 1 workers"),
        ('workers = ["a:1"]\nmin_workers = 2\n', "models.tiny.min_workers: min_workers (2) is more than the 1 workers"),
        ("local_workers = 1\nmin_workers = -1\n", "models.tiny.min_workers: Input should be greater than or equal"),
        ('workers = ["a:1"]\nmax_reshards = -1\n', "models.tiny.max_reshards: Input should be greater than or equal"),
    ],
)
def test_bad_sharded_keys(tmp_path: Path, text: str, message: str) -> None:
    err = sharded(tmp_path, text)
    assert len(err.problems) == 1, err.problems
    assert err.problems[0].split(": ", 1)[1].startswith(message), err.problems[0]


def test_sharded_problems_are_reported_at_once(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "max_reshards = -1\n" + MINIMAL + 'workers = ["a:1", "a"]\nsplit = "x"\n'))
    assert [line.split(": ", 1)[1].split(":")[0] for line in err.problems] == [
        "models.tiny.workers[1]",
        "models.tiny.split",
        "max_reshards",
    ]


def test_unknown_sharded_key_suggests_closest(tmp_path: Path) -> None:
    err = sharded(tmp_path, 'worker = ["a:1"]\n')
    assert str(err).endswith(": models.tiny: unknown key 'worker' (did you mean 'workers'?)")


def test_ledger_settings(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
ledger = "sqlite://state/ledger.db"
ledger_capacity = {cpu = "2GiB", gpu0 = 1024}
priority = "batch"
lease_timeout = "5s"
preempt_grace = "1m"

[models.tiny]
path = "tiny.gguf"
priority = "urgent"
device = "gpu0"
"""))
    assert config.ledger == f"sqlite://{tmp_path / 'state' / 'ledger.db'}"  # against the config's directory
    assert config.ledger_capacity == {"cpu": 2 * 2**30, "gpu0": 1024}
    assert (config.priority, config.lease_timeout, config.preempt_grace) == ("batch", 5.0, 60.0)
    assert (config.models["tiny"].priority, config.models["tiny"].device) == ("urgent", "gpu0")
    assert load_config(write(tmp_path, 'ledger = "redis://h:6379/1"\n' + MINIMAL)).ledger == "redis://h:6379/1"
    defaults = load_config(write(tmp_path, MINIMAL))
    assert (defaults.ledger, defaults.priority, defaults.models["tiny"].priority) == (None, "normal", None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('ledger = "postgres://x"', "ledger: invalid ledger 'postgres://x': expected 'sqlite:///path/ledger.db'"),
        ('ledger = "sqlite://"', "ledger: invalid ledger 'sqlite://': no file"),
        ('ledger_capacity = {cpu = "1GiB"}', "ledger_capacity needs a ledger"),
        ('ledger = "sqlite:///l.db"\nledger_capacity = {cpu = 0}', "ledger_capacity.cpu: Input should be greater than 0"),
        ('ledger = "sqlite:///l.db"\nledger_capacity = {}', "ledger_capacity: invalid ledger_capacity"),
        ('priority = "asap"', "priority: invalid priority 'asap': expected one of urgent, high, normal, low, batch"),
        ('lease_timeout = 0', "lease_timeout: invalid duration 0: must be greater than zero"),
    ],
)
def test_bad_ledger_settings(tmp_path: Path, text: str, problem: str) -> None:
    assert problem in str(load_error(write(tmp_path, text + "\n" + MINIMAL)))


def test_bad_model_lease_settings(tmp_path: Path) -> None:
    error = load_error(write(tmp_path, MINIMAL + 'priority = "soon"\ndevice = "a/b"\n'))
    assert "models.tiny.priority: invalid priority 'soon'" in str(error)
    assert "models.tiny.device: invalid device 'a/b'" in str(error)
