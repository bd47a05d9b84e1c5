//! GitHub integration for GRS (to be built: issue 4).
