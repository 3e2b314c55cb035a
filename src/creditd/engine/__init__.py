"""The metering engine: accounts, ledger, sessions; everything between the API and the stores."""
