//! tune-adapters
