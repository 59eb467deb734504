//! Support library of the system tests lives in `tests/tests/support`.
