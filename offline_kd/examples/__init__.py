"""The embedded demo, its MiniLM teacher, and the tiny fixtures tests and CPU benchmarks build."""
