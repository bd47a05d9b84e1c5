//! End-to-end tests of the assembled GRS live in `tests/`.
