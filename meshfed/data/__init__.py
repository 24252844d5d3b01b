"""A node's own data sets: registered once (a ``.npz`` or CSV file, arrays, or a torch
Dataset), checked before anything is recorded, advertised by name and shape in the node's
signed record, and trained on where they are: the content never leaves the node."""
