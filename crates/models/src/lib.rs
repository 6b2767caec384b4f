//! tune-models
