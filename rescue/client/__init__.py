"""beach-rescue client SDK: an end-to-end encrypted, resumable channel through the relay."""
