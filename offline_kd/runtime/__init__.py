"""Process plumbing shared by every stage: settings and the CLI options generated from them, errors and exit codes, launcher and process-group set-up, progress, library noise."""
