"""The control plane: fallback tokens, guardrails and the kill switch (protocol section 7)."""
