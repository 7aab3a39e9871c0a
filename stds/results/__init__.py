"""What a finished run or sweep gives back: reports (collect runs, tables, plot) and export."""
