//! tune-recipes
