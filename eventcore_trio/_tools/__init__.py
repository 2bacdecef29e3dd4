"""Tooling, not the library: a throwaway PostgreSQL, ready-announcing child processes and
programs, and leader probes. The demo, the torture run, the benchmarks and the tests use it;
`eventcore_trio.testing` re-exports what users' own tests may want.
"""
