//! tune-data
