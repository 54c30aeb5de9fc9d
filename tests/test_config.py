"""Configs: every bad input is refused with a message naming the key (or file) before
anything compiles; includes compose and dotted overrides apply."""

import pytest

from aro_jax import cli
from aro_jax.config import DEFAULT_CONFIG, ConfigError, ExperimentConfig, load_config


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["ppo.foo=1"], "config key 'ppo.foo'"),
        (["ppo.lr=abc"], "config key 'ppo.lr'"),
        (["ppo.num_minibatches=7"], "config key 'ppo.num_minibatches'"),
        (["cluster.nodes.0.profile=no-such-gpu"], "config key 'cluster.nodes.0.profile'"),
        (["env.scenario=outage"], "config key 'env.scenario'"),
        (["cluster.nodes.0.mean_rate_rps=-1"], "config key 'cluster.nodes.0.mean_rate_rps'"),
        (["ppo.lr"], "'ppo.lr' is not of the form key=value"),
        (["objective.slo_margin=0.1"], "config key 'objective.slo_margin'"),  # 0.9 + 0.1 leaves no miss
        (["objective.max_drop=0.01", "objective.drop_margin=0.02"], "config key 'objective.drop_margin'"),  # a negative limit
        (["env.surge_max_multiplier=5"], "config key 'env.surge_max_multiplier'"),  # as heavy as the held-out crowd
        (["env.surge_prob=1.5"], "config key 'env.surge_prob'"),
        (["env.surge_shared_prob=2"], "config key 'env.surge_shared_prob'"),
        (["env.kind=node", "env.surge_shared_prob=0.2"], "config key 'env.surge_shared_prob'"),  # no peers share the surge
        (["env.token_shift_prob=-0.1"], "config key 'env.token_shift_prob'"),
        (["env.token_shift_toward=1.5"], "config key 'env.token_shift_toward'"),
        (["env.token_shift_onset_prob=-1"], "config key 'env.token_shift_onset_prob'"),
        (["env.burst_shift_prob=1.5"], "config key 'env.burst_shift_prob'"),
        (["env.random_fleet_prob=1.5"], "config key 'env.random_fleet_prob'"),
        (["env.demand_phase_prob=-0.5"], "config key 'env.demand_phase_prob'"),
        (["env.demand_scale_max=0.5"], "config key 'env.demand_scale_max'"),  # below 1 would shrink every episode
        (["federated.personal_sends=model"], "config key 'federated.personal_sends'"),
        (["federated.personal_sends=offset", "federated.personal_mix=1.0"], "config key 'federated.personal_sends'"),  # no personal policy
        (["federated.personal_sends=offset", "federated.server_momentum=0.5"], "config key 'federated.personal_sends'"),
        (["federated.personal_mix_anneal=true", "federated.personal_mix=1.0"], "config key 'federated.personal_mix_anneal'"),  # no personal policy
        (["federated.personal_own=[actor_in]"], "config key 'federated.personal_own'"),
        (["federated.personal_own=[critic]", "federated.personal_mix=1.0"], "config key 'federated.personal_own'"),  # no personal policy
    ],
    ids=["unknown-key", "wrong-type", "minibatches-not-dividing", "unknown-profile", "held-out-scenario", "negative-rate", "override-syntax", "margin-past-one", "drop-margin-past-zero", "surge-as-heavy-as-held-out", "surge-prob-past-one", "shared-surge-prob-past-one", "shared-surge-without-cluster", "token-shift-prob-negative", "token-shift-toward-past-one", "token-shift-onset-prob-negative", "burst-shift-prob-past-one", "random-fleet-prob-past-one", "demand-phase-prob-negative", "demand-scale-below-one", "unknown-message", "offset-without-personal", "offset-with-momentum", "anneal-without-personal",
         "own-unknown-network", "own-without-personal"],
)
def test_invalid_override_names_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_error_messages_say_what_is_wrong():
    def message(overrides):
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides)
        return str(err.value)

    assert "does not divide the batch" in message(["ppo.num_minibatches=7"])
    assert "no-such-gpu" in message(["cluster.nodes.0.profile=no-such-gpu"])
    assert "not a training scenario" in message(["env.scenario=outage"])
    assert "must be > 0" in message(["cluster.nodes.0.mean_rate_rps=-1"])


def test_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("ppo: {lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_include_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\nname: b\n")
    with pytest.raises(ConfigError, match="include cycle") as err:
        load_config(tmp_path / "a.yaml")
    assert "a.yaml" in str(err.value)


def test_default_config_loads():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == "default"
    assert len(cfg.cluster.nodes) == 10  # default.yaml includes cluster10.yaml
    assert load_config(DEFAULT_CONFIG) == cfg


def test_include_composes_and_the_including_file_wins(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "cluster:\n  name: pair\n  nodes:\n    - {name: a, mean_rate_rps: 2.0}\n    - {name: b, traffic_mix: code}\nppo: {lr: 1.0e-3, update_epochs: 2}\n"
    )
    (tmp_path / "exp.yaml").write_text("include: [base.yaml]\nname: exp\nppo: {lr: 5.0e-4}\n")
    cfg = load_config(tmp_path / "exp.yaml")
    assert cfg.name == "exp"
    assert [n.name for n in cfg.cluster.nodes] == ["a", "b"]
    assert cfg.cluster.nodes[0].mean_rate_rps == 2.0
    assert cfg.cluster.nodes[1].traffic_mix == "code"
    assert cfg.ppo.update_epochs == 2  # from the included file
    assert cfg.ppo.lr == 5e-4  # the including file overrides its includes
    assert cfg.ppo.gamma == ExperimentConfig().ppo.gamma  # unset keys keep the defaults


def test_overrides_apply():
    cfg = load_config(None, ["ppo.hidden_sizes=[32,32]", "cluster.nodes.0.mean_rate_rps=3", "ppo.lr=1e-4", "env.num_clusters=8"])
    assert cfg.ppo.hidden_sizes == [32, 32]
    assert cfg.cluster.nodes[0].mean_rate_rps == 3.0
    assert isinstance(cfg.cluster.nodes[0].mean_rate_rps, float)
    assert cfg.ppo.lr == 1e-4
    assert cfg.env.num_clusters == 8
    assert cfg.cluster.nodes[1] == load_config().cluster.nodes[1]  # other nodes untouched


def test_cli_bad_override_exits_2_without_traceback(capsys):
    code = cli.main(["train", "ppo.lr=abc"])
    out = capsys.readouterr()
    assert code == 2
    assert "error: config key 'ppo.lr'" in out.err
    assert "Traceback" not in out.err + out.out
