"""Settings: flags win over NLPSERVE_* environment variables, which win over defaults; bad values exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import BatchPolicy, Device, DeviceSampling, Settings, load_settings


def test_defaults_and_flags():
    s = load_settings(
        ["--models", "m", "--port", "0", "--max-batch-size", "8", "--batch-policy", "fixed"], {}
    )
    assert s.models == Path("m") and s.port == 0 and s.max_batch_size == 8
    assert s.batch_policy is BatchPolicy.FIXED
    assert s.device is Device.AUTO and s.metrics_port == 8000 and s.max_queue_size is None
    assert s.device_sampling is DeviceSampling.AUTO and s.device_sampling.enabled is None  # on a GPU
    for value, enabled in (("on", True), ("off", False)):
        assert load_settings(["--models", "m", "--device-sampling", value], {}).device_sampling.enabled is enabled
    # ONNX Runtime's threads spin for generators only unless told: for none, or for every model.
    assert s.intra_op_spinning.spins(generator=True) and not s.intra_op_spinning.spins(generator=False)
    off = load_settings(["--models", "m"], {"NLPSERVE_INTRA_OP_SPINNING": "off"}).intra_op_spinning
    assert not off.spins(generator=True) and not off.spins(generator=False)
    assert load_settings(["--models", "m", "--intra-op-spinning", "on"], {}).intra_op_spinning.spins(generator=False)
    assert s.prefix_caching.on  # prefix caching by default, off when told
    assert not load_settings(["--models", "m"], {"NLPSERVE_PREFIX_CACHING": "off"}).prefix_caching.on
    assert s.mixed_steps.on and not load_settings(["--models", "m", "--mixed-steps", "off"], {}).mixed_steps.on


def test_environment_fills_what_flags_leave_unset():
    env = {
        "NLPSERVE_MODELS": "/srv/models",
        "NLPSERVE_PORT": "6000",
        "NLPSERVE_DEVICE": "cpu",
        "NLPSERVE_MAX_QUEUE_DELAY_MS": "2.5",
        "NLPSERVE_GRACE_SECONDS": "",
    }
    s = load_settings(["--port", "7000"], env)
    assert s.models == Path("/srv/models")
    assert s.port == 7000  # the flag wins
    assert s.device is Device.CPU and s.max_queue_delay_ms == 2.5
    assert s.grace_seconds == 30.0  # an empty variable counts as unset


def test_settings_are_frozen():
    s = load_settings(["--models", "m"], {})
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]
    assert isinstance(s, Settings)


@pytest.mark.parametrize(
    "argv, env, message",
    [
        ([], {}, "--models"),
        (["--models", "m", "--device", "gpu"], {}, "invalid choice"),
        (["--models", "m"], {"NLPSERVE_PORT": "abc"}, "NLPSERVE_PORT"),
        (["--models", "m", "--max-batch-size", "0"], {}, "--max-batch-size must be at least 1"),
        (["--models", "m", "--port", "70000"], {}, "--port"),
        (["--models", "m", "--max-queue-delay-ms", "-1"], {}, "--max-queue-delay-ms"),
        (["--models", "m"], {"NLPSERVE_PREFILL_CHUNK_TOKENS": "-1"}, "--prefill-chunk-tokens must be 0 or more"),
        (["--models", "m", "--stream-interval", "0"], {}, "--stream-interval must be at least 1"),
        (["--models", "m"], {"NLPSERVE_KV_CACHE_TOKENS": "0"}, "--kv-cache-tokens must be at least 1"),
        (["--models", "m", "--cuda-memory-limit-mb", "-1"], {}, "--cuda-memory-limit-mb must be 0 or more"),
        (["--models", "m", "--cuda-arena-extend-strategy", "kHuge"], {}, "invalid choice"),
        (["--models", "m"], {"NLPSERVE_DEVICE_SAMPLING": "gpu"}, "NLPSERVE_DEVICE_SAMPLING"),
        (["--models", "m", "--tls-key", "k.pem"], {}, "--tls-cert and --tls-key go together"),
        (["--models", "m"], {"NLPSERVE_TLS_CERT": "c.pem"}, "--tls-cert and --tls-key go together"),
        (
            ["--models", "m", "--tls-client-ca", "ca.pem"],
            {},
            "--tls-client-ca needs --tls-cert and --tls-key",
        ),
    ],
)
def test_bad_settings_exit_with_a_message(argv, env, message, capsys):
    with pytest.raises(SystemExit) as exc:
        load_settings(argv, env)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_tls_and_api_key_settings():
    s = load_settings(["--models", "m"], {})
    assert (s.tls_cert, s.tls_key, s.tls_client_ca, s.api_keys_file) == (None, None, None, None)
    assert s.open_services == "grpc.health.v1.Health"  # health open by default, once keys are on
    env = {
        "NLPSERVE_TLS_CERT": "/run/secrets/cert.pem",
        "NLPSERVE_TLS_KEY": "/run/secrets/key.pem",
        "NLPSERVE_API_KEYS_FILE": "/run/secrets/keys",
        # The keys themselves: read by server/security.py, never a setting (no flag shows them in `ps`).
        "NLPSERVE_API_KEYS": "k1,k2",
    }
    s = load_settings(["--models", "m", "--tls-client-ca", "ca.pem", "--open-services", "none"], env)
    assert s.tls_cert == Path("/run/secrets/cert.pem") and s.tls_key == Path("/run/secrets/key.pem")
    assert s.tls_client_ca == Path("ca.pem") and s.api_keys_file == Path("/run/secrets/keys")
    assert s.open_services == "none"
    assert not any("k1" in str(value) for value in vars(s).values())


def test_no_flag_takes_an_api_key(capsys):
    with pytest.raises(SystemExit):
        load_settings(["--models", "m", "--api-keys", "k1"], {})
    assert "unrecognized arguments: --api-keys" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, generator_spins, encoder_spins", [("off", False, False), ("generators", True, False), ("on", True, True)]
)
def test_sessions_spin_as_told(quick_repo: Path, flag: str, generator_spins: bool, encoder_spins: bool) -> None:
    from server.metrics import Metrics
    from server.models import load_model
    from server.repository import scan

    settings = load_settings(["--models", str(quick_repo), "--device", "cpu", "--intra-op-spinning", flag], {})
    for config in scan(quick_repo):
        if config.name in ("docgpt", "sentiment"):
            served = load_model(config, settings, Metrics())
            options = served.session.session.get_session_options()
            expected = generator_spins if config.name == "docgpt" else encoder_spins
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(expected))
            if served.scheduler is not None:
                served.scheduler.close()


@pytest.mark.parametrize(
    "flags, mixed",
    [([], True), (["--mixed-steps", "off"], False), (["--prefill-chunk-tokens", "0"], False)],
)
def test_a_mixed_step_graph_gets_a_second_session(llm_repo: Path, flags: list, mixed: bool) -> None:
    """A shared-buffer generator exported with a mixed-step graph is served with a second session on it. Loaded
    in a process without the shared thread pool (the server creates that before its first model), the second
    session's threads do not spin: two spinning pools would take turns on the cores."""
    from server.metrics import Metrics
    from server.models import load_model
    from server.repository import ModelConfig

    settings = load_settings(["--models", str(llm_repo), "--device", "cpu", *flags], {})
    served = load_model(ModelConfig.read(llm_repo / "tinyllama" / "1"), settings, Metrics())
    try:
        model = served.scheduler.model
        assert (model.mixed is not None) is mixed
        options = [s.session.get_session_options() for s in (served.session, model.mixed) if s is not None]
        assert [o.get_session_config_entry("session.intra_op.allow_spinning") for o in options] == ["1", "0"][: len(options)]
        assert all(o.use_per_session_threads for o in options)
    finally:
        served.scheduler.close()
