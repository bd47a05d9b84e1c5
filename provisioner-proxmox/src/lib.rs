//! Proxmox VE backend for GRS (to be built: issue 3).
