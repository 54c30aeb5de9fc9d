"""`aro agent`: its options and how they assemble the agent (imported by aro_jax.cli)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

DEFAULT_METRICS_PORT = 9100


def add_agent_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="an export directory written by `aro export`")
    p.add_argument("--node", help="the node this agent serves (default: given per request, or the only node)")
    p.add_argument("--http", type=int, metavar="PORT", help=f"serve HTTP on PORT (POST /act, GET /healthz, GET /metrics, GET /state); default {DEFAULT_METRICS_PORT} with a metrics source, else JSON lines on stdin/stdout")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    src = p.add_argument_group("control loop (a metrics source turns the agent into a loop that publishes the desired state)")
    src.add_argument("--vllm", metavar="URL[,URL...]", help="scrape these vLLM engines' /metrics directly")
    src.add_argument("--prometheus", metavar="URL", help="read vLLM's metrics through this Prometheus server (HTTP API)")
    src.add_argument("--selector", default="", help="PromQL label matchers for the node's engines, e.g. 'namespace=\"llm\",deployment=\"vllm\"'")
    src.add_argument("--namespace", default="default", help="namespace of the Deployment: label of the published aro_desired_* gauges, and of the kube-state-metrics series read for what it runs (default: default)")
    src.add_argument("--deployment", default="vllm", help="the Deployment: label of the published gauges, whose replicas and pod requests (kube-state-metrics) are read, and which direct mode scales (default: vllm)")
    src.add_argument("--interval", type=float, metavar="S", help="seconds between ticks (default: the export's tick, 30 s)")
    src.add_argument("--shadow", action="store_true", help="decide and publish, never actuate (also hides nothing from /metrics)")
    src.add_argument("--min-replicas", type=float, help="lowest desired replica count (default: the export's limit)")
    src.add_argument("--max-replicas", type=float, help="highest desired replica count (default: the export's limit)")
    src.add_argument("--max-step", type=int, default=1, help="most replicas added or removed per tick (default 1)")
    src.add_argument("--stale-ticks", type=int, default=3, help="bad ticks in a row before the Reactive fallback (default 3)")
    src.add_argument("--direct", action="store_true", help="patch the Deployment's scale with the kubernetes client (refused if an HPA owns it)")
    src.add_argument("--clock-query", metavar="PROMQL", help="take the clock (s since Monday 00:00 UTC) from this PromQL expression and tick when it advances (replays, accelerated tests)")


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def run_agent(args) -> int:
    from aro_jax.deploy import service
    from aro_jax.deploy.agent import Agent
    from aro_jax.deploy.export import ExportError, load_policy

    if args.vllm and args.prometheus:
        return _error("choose one metrics source: --vllm or --prometheus")
    if (args.selector or args.clock_query) and not args.prometheus:
        return _error("--selector and --clock-query need --prometheus URL")
    try:
        policy = load_policy(Path(args.policy))
        agent = Agent(policy, args.node)
    except (ExportError, ValueError) as e:
        return _error(str(e))
    if not (args.vllm or args.prometheus):
        if args.http is None:
            service.serve_jsonl(agent)
            return 0
        try:
            service.serve_http(agent, args.host, args.http)
        except service.ServiceError as e:
            return _error(str(e))
        return 0
    return _run_loop(args, policy, agent.telemetry)


def _run_loop(args, policy, telemetry) -> int:
    from aro_jax.deploy import service
    from aro_jax.deploy.control_loop import ControlLoop, LoopOptions, week_clock_s
    from aro_jax.deploy.metrics_source import PrometheusQuery, SourceError, VllmScrape

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.vllm:
            source = VllmScrape([u.strip() for u in args.vllm.split(",") if u.strip()])
        else:
            source = PrometheusQuery(args.prometheus, args.selector, namespace=args.namespace, deployment=args.deployment)
        clock = week_clock_s
        if args.clock_query:
            def clock():
                result = source.instant(args.clock_query)
                if not result:
                    raise SourceError(f"--clock-query {args.clock_query!r} returned no series")
                return float(result[0]["value"][1])
        actuator = None
        if args.direct and not args.shadow:
            from aro_jax.deploy.k8s_scaler import KubernetesScaler, ScalerRefused

            try:
                actuator = KubernetesScaler(args.namespace, args.deployment)
            except ScalerRefused as e:
                return _error(str(e))
        options = LoopOptions(namespace=args.namespace, deployment=args.deployment, shadow=args.shadow, min_replicas=args.min_replicas,
                              max_replicas=args.max_replicas, max_step=args.max_step, stale_ticks=args.stale_ticks, interval_s=args.interval)
        loop = ControlLoop(policy, args.node, source, options, clock=clock, actuator=actuator, telemetry=telemetry)
        server = service.make_http_server(loop.agent, args.host, DEFAULT_METRICS_PORT if args.http is None else args.http, loop=loop)
    except (ValueError, service.ServiceError) as e:
        return _error(str(e))
    threading.Thread(target=server.serve_forever, name="aro-http-accept", daemon=True).start()
    loop.install_sighup()
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    mode = "shadow (publish only)" if args.shadow else ("direct (patching the Deployment)" if actuator else "publish for KEDA/HPA")
    print(f"aro agent: node {loop.node}, {source.describe()}, every {loop.interval_s:g} s, {mode}; "
          f"aro_desired_replicas{{namespace={args.namespace!r},deployment={args.deployment!r}}} on http://{args.host}:{server.server_port}/metrics",
          file=sys.stderr, flush=True)
    try:
        loop.run(clock_driven=bool(args.clock_query), poll_s=0.02)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    return 0
