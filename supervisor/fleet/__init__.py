"""The fleet keeper: one per fleet, keeps the scale sets at the size the queue needs.

  settings   the `[fleet]` section (also read by each VM's supervisor: retire_when_idle_s)
  model      what one look at the fleet sees: backlog, scale sets, instances, retire requests
  decide     the reconcile pass as pure logic: facts in, actions out (no I/O)
  arm        Azure Resource Manager through azure-mgmt-compute (the `fleet` extra)
  observe    reading the facts: the queue's backlog, the scale sets, `<queue>-fleet`
  retire     retire requests: parsing hostile input, matching an instance
  keeper     one pass (observe, decide, act) and the loop around it; metrics, sd_notify
  report     `fleet plan` / `fleet status` output
  cli        `spot-supervisor fleet run | plan | status`

The per-VM service imports only `settings` (and `supervisor.pool.retirement`); nothing here may
import azure.mgmt at module level except `arm`.
"""
