//! End-to-end tests of real processes live in this package's test targets; the shared
//! fixtures are in `dispatcher-testkit`. This library is empty on purpose.
