"""Reference solutions of the two exercises, the switch that picks whose code runs, and the grader."""
