//! The GRS webhook gateway (to be built: issue 4).
