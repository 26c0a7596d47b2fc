"""Several relay nodes: the node registry, control-plane routing and how a node leaves."""
