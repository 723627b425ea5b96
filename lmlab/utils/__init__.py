"""The ground floor: helpers every layer may use (atomic writes, logging setup)."""
