"""Global learning rounds: feedback in, a gated version out (rounds), how a candidate is trained
(strategies, avalanche_model, ewc_state, replay), the data shipped for it (base_sets), and the
gate that decides on evidence (gate, agreement)."""
