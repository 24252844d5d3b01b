"""Coverage-guided fuzz harnesses (atheris) for every decoder and state machine that takes
network input. SPEC.md, "Fuzzing". Run one with ``python -m fuzz.run <harness> [libFuzzer
options] [corpus dirs]``; ``benchmarks/fuzz.py`` runs them all."""

#: every harness, by module name under ``fuzz/``
HARNESSES = (
    "envelope",
    "schemas",
    "arrays",
    "array_parts",
    "sealed_frames",
    "key_exchange",
    "peer_records",
    "swim",
    "cyclon",
    "secagg",
    "mdns_txt",
    "market",
    "onion",
)
