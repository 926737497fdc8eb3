"""Data sources, parsers and partitioners. Records are raw (text, labelled text, instructions, arrays);
a task encodes them into tensors."""
