"""The benchmark's targets and its printed table, from the results `bench.run` gathered."""

from __future__ import annotations

import os
from typing import Any

#: Each target's limit; a figure without one here is printed, not judged.
TARGETS = {
    # B's mail while A's 20,000 drain on a slow relay: p99 enqueue -> server's 250
    "fairness_p99_s": 1.0,
    # A's drain rate >= this share of max_connections / relay time per message
    "drain_rate_share": 0.85,
    # end to end vs the Celery no-op drain rate, per door
    "e2e_by_name_one_vs_noop": 0.60,
    "e2e_by_name_many_vs_noop": 1.00,
    "e2e_python_many_vs_noop": 1.00,
    "e2e_python_one_vs_noop": 1.00,
    # Celery messages the worker takes per delivered mail
    "tasks_per_mail_by_name": 1.1,
    "tasks_per_mail_bulk": 0.1,
    # SMTP cost per message with reuse <= 1.5x raw smtplib, >= 10 messages a connection
    "smtp_vs_raw": 1.5,
    "msgs_per_connection": 10,
    # signed webhooks on: the Python door's bulk rate >= this share of the same door off
    "events_on_vs_off": 0.90,
    # a steady sender's events: p99 from the change to the receiver's 200
    "events_delay_p99_s": 2.0,
    # worker RSS with 100k deferred <= idle + 50 MB
    "memory_mb": 50.0,
    # one sweep batch of each query at 1M < 50 ms, and within 2x of its time at 10k
    "sweep_ms": 50.0,
    "sweep_ratio": 2.0,
}

DOORS = (
    ("e2e_python_many", "Python door, enqueue_many"),
    ("e2e_python_one", "Python door, enqueue"),
    ("e2e_by_name_many", "by name, outbox.enqueue_many"),
    ("e2e_by_name_one", "by name, outbox.enqueue"),
)


def _check(target: str, value: str, ok: bool) -> dict[str, Any]:
    return {"target": target, "value": value, "pass": bool(ok)}


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its figure, limit and PASS/FAIL (of the phases that ran)."""
    out: list[dict[str, Any]] = []
    if "fairness" in r:
        out += _fairness_checks(r["fairness"])
    noop = r.get("ceiling_celery", {}).get("tasks_per_s")
    for key, label in (
        ("e2e_by_name_one", "outbox.enqueue by name"),
        ("e2e_by_name_many", "outbox.enqueue_many by name"),
        ("e2e_python_many", "Python door enqueue_many"),
        ("e2e_python_one", "Python door enqueue"),
    ):
        if key not in r or not noop:
            continue
        rate = r[key]["msgs_per_s"]
        limit = TARGETS[f"{key}_vs_noop"]
        out.append(
            _check(
                f"end to end, {label} >= {limit:.0%} of the no-op",
                f"{rate:,.0f} mail/s = {rate / noop:.0%} of {noop:,.0f} tasks/s",
                rate >= limit * noop,
            )
        )
    for key, label, limit in (
        ("e2e_by_name_one", "by name (enqueue)", TARGETS["tasks_per_mail_by_name"]),
        ("e2e_by_name_many", "in bulk by name (enqueue_many)", TARGETS["tasks_per_mail_bulk"]),
        ("e2e_python_many", "in bulk, Python door (enqueue_many)", TARGETS["tasks_per_mail_bulk"]),
    ):
        if key not in r:
            continue
        per = r[key]["tasks_per_message"]
        out.append(
            _check(
                f"Celery messages per mail, {label} <= {limit:g}",
                f"{per:.3f} ({_tasks(r[key]['tasks'])})",
                per <= limit,
            )
        )
    doors = [d for d, _ in DOORS if d in r]
    if "smtp_pool" in r and doors:
        raw = r["ceiling_smtp"]["client_ms_per_msg"]
        pool = r["smtp_pool"]["client_ms_per_msg"]
        reuse = min(r[d]["msgs_per_connection"] for d in doors)
        out.append(
            _check(
                f"SMTP cost/msg with reuse (pool) <= {TARGETS['smtp_vs_raw']}x raw smtplib, end "
                f"to end >= {TARGETS['msgs_per_connection']} msgs/connection",
                f"{pool:.3f} vs {raw:.3f} ms = {pool / raw:.2f}x; end to end >= {reuse:g} "
                "msgs/connection",
                pool <= TARGETS["smtp_vs_raw"] * raw and reuse >= TARGETS["msgs_per_connection"],
            )
        )
    if "events" in r:
        out += _events_checks(r["events"])
    if "memory" in r:
        mem = r["memory"]
        for key, label, snap_key in (
            ("growth_parked_mb", "parked in the database", "parked_in_db"),
            ("growth_due_soon_mb", "due within OUTBOX_COUNTDOWN_MAX", "due_soon"),
        ):
            out.append(
                _check(
                    f"memory: {mem['deferred']:,} deferred ({label}) <= idle + "
                    f"{TARGETS['memory_mb']:g} MB",
                    f"{mem['idle']['worker']['total_mb']} -> "
                    f"{mem[snap_key]['worker']['total_mb']} MB ({mem[key]:+g} MB)",
                    mem[key] <= TARGETS["memory_mb"],
                )
            )
    if "sweep" in r:
        largest, smallest = r["sweep"][-1], r["sweep"][0]
        for kind in ("sweep_messages", "sweep_accounts"):
            big, small = largest[kind]["median_ms"], smallest[kind]["median_ms"]
            out.append(
                _check(
                    f"{kind}: batch at {largest['messages']:,} < {TARGETS['sweep_ms']:g} ms and "
                    f"<= {TARGETS['sweep_ratio']:g}x its time at {smallest['messages']:,}",
                    f"{big:.2f} ms = {big / small:.2f}x {small:.2f} ms",
                    big < TARGETS["sweep_ms"] and big / small <= TARGETS["sweep_ratio"],
                )
            )
    return out


def _fairness_checks(f: dict[str, Any]) -> list[dict[str, Any]]:
    p99 = f["b_latency"]["p99_s"]
    share = TARGETS["drain_rate_share"]
    return [
        _check(
            f"fairness: B's p99 enqueue->250 while A's {f['backlog']:,} drain "
            f"<= {TARGETS['fairness_p99_s']:g} s",
            f"{p99:.2f} s (p50 {f['b_latency']['p50_s']:.2f}, max {f['b_latency']['max_s']:.2f}, "
            f"{f['b_latency']['n']} mails)",
            p99 <= TARGETS["fairness_p99_s"],
        ),
        _check(
            f"fairness: A's drain rate >= {share:.0%} of {f['a_max_connections']} connections / "
            f"{f['slow_relay_s'] * 1000:.0f} ms = {share * f['a_ceiling_msgs_per_s']:.0f} msg/s",
            f"{f['a_msgs_per_s']:.1f} msg/s = {f['a_msgs_per_s'] / f['a_ceiling_msgs_per_s']:.0%} "
            f"(peak {f['a_peak_connections']} connections)",
            f["a_msgs_per_s"] >= share * f["a_ceiling_msgs_per_s"],
        ),
    ]


def _tasks(tasks: dict[str, Any]) -> str:
    received = tasks["received"]
    return ", ".join(f"{name} {n:,}" for name, n in sorted(received.items())) or "none"


def _cpus(r: dict[str, Any]) -> int:
    return int(r.get("meta", {}).get("machine", {}).get("cpus") or os.cpu_count() or 1)


def cpu_line(cpu: dict[str, float], *, cpus: int) -> str:
    """CPU ms per message by process group, and the rate all the machine's cores could
    sustain at that cost: the ceiling no tuning of concurrency can lift."""
    parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if k != "total")
    bound = cpus * 1000 / cpu["total"] if cpu["total"] else float("inf")
    line = f"{cpu['total']:.2f} ms ({parts}); {cpus} cores bound it at {bound:,.0f}/s"
    # Celery's main process is one thread: it alone caps the rate at 1 / its cost.
    main = cpu.get("worker main")
    return line + (f", the worker's main process at {1000 / main:,.0f}/s" if main else "")


def machine(m: dict[str, Any] | None) -> str:
    """What else used the machine during a measured window."""
    if not m:
        return "(not measured)"
    return (
        f"other processes {m['others_cores']:.2f} + steal {m['steal_cores']:.2f} of "
        f"{m['cores']} cores (the benchmark's {m['ours_cores']:.2f}) over {m['window_s']:.0f} s"
    )


def _lat(s: dict[str, Any]) -> str:
    return f"p50 {s['p50_s']:.2f} s, p99 {s['p99_s']:.2f} s, max {s['max_s']:.2f} s ({s['n']})"


def table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    conc = r["meta"]["args"]["concurrency"]
    if "ceiling_smtp" in r:
        rows += _smtp_rows(r)
    noop = None
    if "ceiling_celery" in r:
        c = r["ceiling_celery"]
        noop = c["tasks_per_s"]
        rows.append(
            (
                f"Ceiling: Celery no-op, prefork -c{conc}",
                f"{c['tasks_per_s']:,.0f} tasks/s  "
                f"(prefetch x{c['settings']['worker_prefetch_multiplier']}, acks_late, -E)",
            )
        )
        rows.append(("  CPU per task (no-op)", cpu_line(c["cpu_ms_per_task"], cpus=_cpus(r))))
        rows.append(("  machine meanwhile", machine(c.get("machine"))))
    if "fairness" in r:
        rows += _fairness_rows(r["fairness"])
    if "burst" in r:
        b = r["burst"]
        rows.append(
            (
                f"Burst: {b['messages']:,} outbox.enqueue by name (C)",
                f"published in {b['publish_s']:.1f} s, all stored after "
                f"{b['all_stored_after_s']:.1f} s ({b['intake_msgs_per_s']:,.0f}/s), all sent "
                f"after {b['all_sent_after_s']:.1f} s; Celery messages: {_tasks(b['tasks'])}",
            )
        )
        for phase, lat in b["b_latency"].items():
            rows.append((f"  B's enqueue->250, {phase} the burst", _lat(lat)))
        rows.append(("  machine during the burst", machine(b.get("machine"))))
    if "e2e_setup" in r:
        rows += _e2e_rows(r, noop)
    if "events" in r:
        rows += _events_rows(r["events"])
    if "memory" in r:
        rows += _memory_rows(r["memory"])
    for row in r.get("sweep", []):
        sm, sa = row["sweep_messages"], row["sweep_accounts"]
        rows.append(
            (
                f"Sweep: {row['messages']:,} msgs, {row['accounts']:,} accounts",
                f"sweep_messages median {sm['median_ms']:.2f} ms (min {sm['min_ms']:.2f}, max "
                f"{sm['max_ms']:.2f}); sweep_accounts median {sa['median_ms']:.2f} ms (min "
                f"{sa['min_ms']:.2f}, max {sa['max_ms']:.2f}); indexes: {sm['uses_index']}/"
                f"{sa['uses_index']}",
            )
        )
    width = max((len(a) for a, _ in rows), default=0)
    lines = ["", "Figures", "-" * 100]
    lines += [f"{a:<{width}}  {b}" for a, b in rows]
    lines += ["", "Targets", "-" * 100]
    checks = r["targets"]
    twidth = max((len(v["target"]) for v in checks), default=0)
    lines += [
        f"{'PASS' if v['pass'] else 'FAIL'}  {v['target']:<{twidth}}  {v['value']}" for v in checks
    ]
    passed = sum(v["pass"] for v in checks)
    lines.append(f"\n{passed}/{len(checks)} targets pass; total run {r['meta']['runtime_s']:.0f} s")
    loads = [load for _, load in r["meta"]["machine"]["load1_per_phase"]]
    cpus = r["meta"]["machine"]["cpus"] or 1
    # Later phases' load averages include the benchmark's own processes of the phase
    # before; only the first one says whether something else was running.
    lines.append(
        f"load average (1 min) before the run: {loads[0]:.1f} on {cpus} CPUs; at later "
        f"phases' start (the benchmark's own load included): {min(loads[1:], default=0):.1f}"
        f"-{max(loads[1:], default=0):.1f}"
        + ("  << other work was running: rates are lower bounds" if loads[0] > cpus * 0.5 else "")
    )
    return "\n".join(lines)


def _smtp_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    s, p = r["ceiling_smtp"], r["smtp_pool"]
    return [
        (
            "Ceiling: raw smtplib, 1 connection",
            f"{s['msgs_per_s']:,.0f} msg/s  ({s['client_ms_per_msg']:.3f} ms/msg client, "
            f"{s['sink_tx_median_ms']:.3f} ms MAIL->DATA at sink; {s['message_bytes']:,} B)",
        ),
        (
            "SMTP via SmtpConnectionPool.send",
            f"{p['msgs_per_s']:,.0f} msg/s  ({p['client_ms_per_msg']:.3f} ms/msg = "
            f"{p['client_ms_per_msg'] / s['client_ms_per_msg']:.2f}x raw; "
            f"{p['connections']} connections)",
        ),
        ("  machine (raw / pool)", f"{machine(s.get('machine'))} / {machine(p.get('machine'))}"),
    ]


def _fairness_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (
            f"Fairness: B by name every {f['b_interval_s']:g} s, {f['window_s']:.0f} s",
            f"enqueue->250 {_lat(f['b_latency'])}, while A's {f['backlog']:,} drain "
            f"(accepted in {f['backlog_accept_s']:.1f} s, {f['a_pending_after']:,} still pending "
            "after)",
        ),
        (
            "  A's drain rate (slow relay)",
            f"{f['a_msgs_per_s']:.1f} msg/s = {f['a_msgs_per_s'] / f['a_ceiling_msgs_per_s']:.0%}"
            f" of {f['a_max_connections']} x 1/{f['slow_relay_s']:g} s; peak "
            f"{f['a_peak_connections']} connections; -c{f['concurrency']}",
        ),
        ("  machine meanwhile", machine(f.get("machine"))),
    ]


def _e2e_rows(r: dict[str, Any], noop: float | None) -> list[tuple[str, str]]:
    setup = r["e2e_setup"]
    rows = [
        (
            "End to end: set-up",
            f"{setup['accounts']} accounts on the fast sink, max_connections "
            f"{setup['max_connections']} each, worker -c{setup['concurrency']}, drain batch "
            f"{setup['drain_batch']} / {setup['drain_seconds']:g} s; timed from the first call "
            "to the last 250 recorded",
        )
    ]
    for key, label in DOORS:
        e = r[key]
        share = f" = {e['msgs_per_s'] / noop:.0%} of no-op" if noop else ""
        rows.append(
            (
                f"End to end, {label}",
                f"{e['msgs_per_s']:,.0f} mail/s{share}  ({e['messages']:,} in {e['seconds']:.1f}"
                f" s; calls took {e['calls_s']:.1f} s, all stored after "
                f"{e['all_stored_after_s']:.1f} s)",
            )
        )
        rows.append(
            ("  Celery messages per mail", f"{e['tasks_per_message']:.3f}  ({_tasks(e['tasks'])})")
        )
        rows.append(("  CPU per mail", cpu_line(e["cpu_ms_per_message"], cpus=_cpus(r))))
        rows.append(("  machine meanwhile", machine(e.get("machine"))))
        rows.append(
            (
                "  SMTP / attempt",
                f"{e['smtp_connections']} connections, {e['msgs_per_connection']:g} msgs each; "
                f"MAIL->DATA {e['sink_tx_median_ms']:.3f} ms at sink; attempt started->finished "
                f"median {e['attempt_median_ms']:.2f} ms, p90 {e['attempt_p90_ms']:.2f} ms",
            )
        )
    return rows


def _events_checks(ev: dict[str, Any]) -> list[dict[str, Any]]:
    share, p99 = TARGETS["events_on_vs_off"], TARGETS["events_delay_p99_s"]
    paced = ev["paced"]["delay"]
    return [
        _check(
            f"events: Python enqueue_many with a webhook >= {share:.0%} of its rate without",
            f"{ev['on_msgs_per_s']:,.0f} vs {ev['off_msgs_per_s']:,.0f} mail/s = "
            f"{ev['on_vs_off']:.0%}",
            ev["on_vs_off"] >= share,
        ),
        _check(
            f"events: a steady sender's p99 change -> webhook's 200 <= {p99:g} s",
            f"{paced['p99_s']:.2f} s (p50 {paced['p50_s']:.2f}, {paced['n']} events)",
            paced["p99_s"] <= p99 and ev["unverified_posts"] == 0,
        ),
    ]


def _events_rows(ev: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for run in ev["runs"]:
        on = run["webhook"]
        rows.append(
            (
                f"Events: enqueue_many, webhook {'on' if on else 'off'}",
                f"{run['msgs_per_s']:,.0f} mail/s ({run['messages']:,} in {run['seconds']:.1f} s;"
                f" {run['events']:,} events"
                + (
                    f", all at the webhook after {run['all_events_posted_after_s']:.1f} s)"
                    if on
                    else ")"
                )
                + f"; {run['tasks_per_message']:.3f} Celery msgs/mail; "
                f"CPU {run['cpu_ms_per_message']['total']:.1f} ms/mail",
            )
        )
    rows.append(("  on vs off (means)", f"{ev['on_vs_off']:.0%}"))
    rows.append(("  delay change -> 200, bulk runs", _lat(ev["bulk_delay"])))
    paced = ev["paced"]
    rows.append(
        (
            f"  delay, one mail by name every {paced['every_s']:g} s",
            f"{_lat(paced['delay'])} ({paced['mails']} mails)",
        )
    )
    return rows


def _memory_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, label in (
        ("idle", "idle (warm)"),
        ("parked_in_db", f"{m['deferred']:,} parked in DB"),
        ("due_soon", f"{m['deferred']:,} due within COUNTDOWN_MAX"),
    ):
        snap = m[key]
        rows.append(
            (
                f"Memory: {label}",
                f"worker {snap['worker']['total_mb']:.1f} MB "
                f"(main {snap['worker']['main_mb']:.1f} + {snap['worker']['children_mb']}), "
                f"redis {snap['redis_used_mb']:.1f} MB, countdowns held {snap['unacked']:,}, "
                f"waiting in outbox.retry {snap['retry_queue']:,}",
            )
        )
    return rows
