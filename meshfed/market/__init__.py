"""The market: work asked for, bid on, leased, done and paid for (SPEC.md, "Market").

Rooms: :mod:`.terms` (tiers, kinds, amounts, requirements: the shared vocabulary),
:mod:`.messages` (RFQ ... Receipt on the wire), :mod:`.auction` (pure clearing),
:mod:`.pricing` (asks and estimates), :mod:`.lease` (the sans-IO buyer and seller state
machines), :mod:`.ledger` (double-entry accounts in the node's store), :mod:`.reputation`,
and :mod:`.driver` (the thin trio driver on a node). ``training/`` never imports the market:
the market hands training a signed job and reads its round reports.
"""
