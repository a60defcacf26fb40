from deeptune.main import run

run()
