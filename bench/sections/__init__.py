"""The sections of ``python -m bench``, one module each, registered with
``bench.registry.section`` and found by ``bench.registry.sections``."""
