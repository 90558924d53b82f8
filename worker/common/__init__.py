"""Small utilities the supervisor uses too. They live on the worker side because
`supervisor` -> `worker` is the only import direction between the two packages."""
