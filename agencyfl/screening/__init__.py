"""Population screening with encrypted cross-agency scores, and worklists for caseworkers (``docs/screening.md``)."""
