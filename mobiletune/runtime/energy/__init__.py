"""Energy-aware scheduling on the phone: battery providers, clocks, the per-step energy meter
and the pure scheduling policy (standard library only)."""
