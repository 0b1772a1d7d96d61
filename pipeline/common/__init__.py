"""What the stages share: typed params, file names, atomic files, MLflow tracking, scoring, the text side of
translation, inspection, the Ray worker. A stage imports these, never another stage."""
