"""Pure billing rules: money, rates, wallets, periods, sessions. No I/O lives here."""
