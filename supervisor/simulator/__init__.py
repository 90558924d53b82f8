"""A local Azure IMDS (and EC2 / Compute Engine metadata) over real HTTP, for the demo, the tests and the benchmarks.

A development tool: `spot-supervisor run` never imports it (only `simulate`
does), so this package's `__init__` stays empty of imports.

  state   the model: instance metadata, Scheduled Events with their clock and
          DocumentIncarnation, acks, injected faults, request counts
  server  `ImdsSimulator`: the model served over HTTP on a background thread
  cli     `spot-supervisor simulate` (--cloud azure|aws|gcp)
  aws, gcp        the EC2 IMDSv2 and Compute Engine metadata models (their docstrings list
                  their paths and controls), served by metadata_http

Azure endpoints (400 without `Metadata: true` or without api-version):
  GET  /metadata/instance?api-version=...
  GET  /metadata/scheduledevents?api-version=...
  POST /metadata/scheduledevents?api-version=...   {"StartRequests": [{"EventId": ...}]}

Control endpoints (JSON in and out, no Metadata header needed):
  POST   /simulate/eviction        {"delay_s", "resources", "complete_after_s"}
  POST   /simulate/event           {"type", "delay_s", "resources", "status", "source",
                                    "duration_s", "description", "complete_after_s"}
  DELETE /simulate/event/<EventId>
  POST   /simulate/document        a whole Scheduled Events document, served verbatim
  POST   /simulate/verbatim-event  any text, served as one more item of Events exactly as sent
  POST   /simulate/faults          {"mode": "500"|"410"|"429"|"slow"|"garbage"|"reset",
                                    "count", "delay_s", "retry_after_s"}
  POST   /simulate/reset
  GET    /simulate/acks            [{"time", "body", "raw", "headers"}, ...]
  GET    /simulate/requests        {"GET /metadata/scheduledevents": n, ...}

Events created here start by themselves once NotBefore passes (NotBefore
becomes "") and, given complete_after_s, disappear that long after starting.
Events loaded with /simulate/document are served as given: no clock applies
to them, so fixture files keep their meaning whatever today's date.
"""
