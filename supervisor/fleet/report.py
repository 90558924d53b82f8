"""`fleet plan` and `fleet status`: one look at the fleet, as JSON or for a person. Changes nothing."""

from __future__ import annotations

from typing import Any

from supervisor.fleet.decide import Plan
from supervisor.fleet.observe import RetireInbox


def plan_document(plan: Plan, inbox: RetireInbox) -> dict[str, Any]:
    b = plan.backlog
    return {
        "backlog": {"visible": b.visible, "in_flight": b.in_flight, "exact": b.exact, "error": b.error},
        "target": plan.target,
        "target_reason": plan.target_reason,
        "alive": plan.alive,
        "after": plan.after,
        "deficit": plan.deficit,
        "scale_sets": [{
            "id": p.view.id, "name": p.view.name, "capacity": p.view.capacity,
            "running": p.view.count("running"), "starting": p.view.count("starting"),
            "deallocated": p.view.count("deallocated"), "failed": p.view.count("failed"),
            "reachable": p.view.reachable, "error": None if p.view.reachable else f"{p.view.error_kind}: {p.view.error}",
            "action": p.action,
        } for p in plan.scale_sets],
        "retire_requests": [{"vm_name": d.request.vm_name[:256], "resource_id": d.request.resource_id[:1024], "at": d.request.at,
                             "granted": d.granted, "reason": d.reason} for d in plan.retirements],
        "fleet_queue": {"not_retire_requests": len(inbox.rejected), "error": inbox.error},
    }


def format_status(plan: Plan, inbox: RetireInbox) -> str:
    doc = plan_document(plan, inbox)
    b = doc["backlog"]
    lines = [f"backlog:  {b['visible']}{'' if b['exact'] else '+'} visible, {b['in_flight']} in flight"
             + (f" ({b['error']})" if b["error"] else ""),
             f"target:   {plan.target} VMs ({plan.target_reason})",
             f"alive:    {plan.alive} VMs now, {plan.after} once this pass is done", ""]
    header = ("scale set", "capacity", "running", "starting", "deallocated", "failed", "action")
    rows = [header] + [(s["name"], "?" if s["capacity"] is None else str(s["capacity"]), str(s["running"]), str(s["starting"]),
                        str(s["deallocated"]), str(s["failed"]), s["action"]) for s in doc["scale_sets"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    for r in doc["retire_requests"]:
        lines.append(f"retire request: {r['vm_name']}: {'granted' if r['granted'] else 'refused'} ({r['reason']})")
    if inbox.rejected:
        lines.append(f"fleet queue: {len(inbox.rejected)} messages that are no retire request")
    if inbox.error:
        lines.append(f"fleet queue: {inbox.error}")
    return "\n".join(lines)
