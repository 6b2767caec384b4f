//! Checks a whole config against the registry. (Placeholder: being completed.)
