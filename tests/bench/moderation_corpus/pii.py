"""PII cases: a text and the values in it that must be redacted, by entity.

Positives cover the formats of issue 20 (phones of several countries and
``00`` prefixes, internationalised addresses, apostrophes, whole private key
blocks, the listed key prefixes); negatives are look-alikes that must stay
(coordinates, dates, versions, asset names, certificates, prose).
"""

PEM_RSA = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
    "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
    "LxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW/VDL5AaWTg0nLVkjRo\n"
    "9z+40RQzuVaE8AkAFmxZzow3x+VJYKdjykkJ0iT9wCS0DRTXu269V264Vf/3jvre\n"
    "dZ0g5DwQW8j0SZAUOvNU4hs+7zFkH4nBs1EGWqYYrYuu+Bdr0EYvT7hrCNFN6sF1\n"
    "x2KwJ9pWFEBmNR8o5kP4Z8u6gaXSpsF+oDGFLQIDAQAB\n-----END RSA PRIVATE KEY-----"
)
PEM_EC = (
    "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5oY1nRdY2H3rDoAoGCCqGSM49\n"
    "AwEHoUQDQgAEYWfVJ6Lf2K7JYtP2ZqYSUNf1OCVwcg7DB6vVjM7bq2lEAB1q3VW\n-----END EC PRIVATE KEY-----"
)
PEM_PKCS8 = (
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj\n"
    "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu\n-----END PRIVATE KEY-----"
)
PGP = (
    "-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2\n\nlQOYBF0hM2ABCADe8Z3nVtq2pZLm8h4s7qfa0Ikm\n"
    "xH1o5vq3e7LwPd2b9gQk0VZ8mR6hY2sT1uJ4cN5fA3eW7oP9iK0lQ2rS4tU6v\n=Xy9Q\n-----END PGP PRIVATE KEY BLOCK-----"
)
CERTIFICATE = "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBa\n-----END CERTIFICATE-----"

CASES: list[tuple[str, list[tuple[str, str]]]] = [
    # -- e-mail
    ("Write to bob@example.com for details.", [("email", "bob@example.com")]),
    ("Mail first.last+tag@sub.example.co.uk today", [("email", "first.last+tag@sub.example.co.uk")]),
    ("Contact: ALICE@EXAMPLE.ORG.", [("email", "ALICE@EXAMPLE.ORG")]),
    ("Ask o'brien@example.ie about it.", [("email", "o'brien@example.ie")]),
    ("Her address is josé.garcía@correo.example.es", [("email", "josé.garcía@correo.example.es")]),
    ("Schreib an jürgen@bücher.example", [("email", "jürgen@bücher.example")]),
    ("请联系 用户@例子.中国 获取帮助。", [("email", "用户@例子.中国")]),
    ("Пишите на иван@пример.рф, спасибо.", [("email", "иван@пример.рф")]),
    ("メールは taro@example.jp までお願いします。", [("email", "taro@example.jp")]),
    ("Punycode: user@xn--bcher-kva.example works", [("email", "user@xn--bcher-kva.example")]),
    ("(dev_team@corp.example.com)", [("email", "dev_team@corp.example.com")]),
    ("Two: a.b@x.example.org and c-d@y.example.net.", [("email", "a.b@x.example.org"), ("email", "c-d@y.example.net")]),
    ("Fullwidth ｂｏｂ＠example.com too", [("email", "ｂｏｂ＠example.com")]),
    ("Use icon@2x.png and logo@3x.webp for retina screens.", []),
    ("The @media rule and @import are CSS.", []),
    ("Follow @sluice_gw on the forum.", []),
    ("Version pinned as package@1.2.3 in the lockfile.", []),
    ("user@localhost is not routable", []),
    # -- phone
    ("Call +1 212 555 0123 now.", [("phone", "+1 212 555 0123")]),
    ("Office: (212) 555-0147.", [("phone", "(212) 555-0147")]),
    ("US line 415-555-0132 after six", [("phone", "415-555-0132")]),
    ("London +44 20 7946 0958", [("phone", "+44 20 7946 0958")]),
    ("UK local 020 7946 0958 works too", [("phone", "020 7946 0958")]),
    ("Paris : +33 1 42 68 53 00", [("phone", "+33 1 42 68 53 00")]),
    ("Appelez le 01 42 68 53 00 ou le 06 12 34 56 78.", [("phone", "01 42 68 53 00"), ("phone", "06 12 34 56 78")]),
    ("Berlin: +49 30 12345678", [("phone", "+49 30 12345678")]),
    ("Rufen Sie 030 12345678 an, mobil 0171 1234567.", [("phone", "030 12345678"), ("phone", "0171 1234567")]),
    ("International: 0049 30 12345678", [("phone", "0049 30 12345678")]),
    ("From abroad dial 0033 1 42 68 53 00.", [("phone", "0033 1 42 68 53 00")]),
    ("电话：+86 138 0013 8000", [("phone", "+86 138 0013 8000")]),
    ("手机 138 0013 8000，座机 010-6552 9988。", [("phone", "138 0013 8000"), ("phone", "010-6552 9988")]),
    ("東京 +81 3-1234-5678 まで", [("phone", "+81 3-1234-5678")]),
    ("電話は 03-1234-5678 です", [("phone", "03-1234-5678")]),
    ("Madrid +34 612 34 56 78", [("phone", "+34 612 34 56 78")]),
    ("Llama al 612 34 56 78 mañana", [("phone", "612 34 56 78")]),
    ("Москва +7 495 123-45-67", [("phone", "+7 495 123-45-67")]),
    ("Coordinates +40.712776, -74.005974 mark the spot.", []),
    ("It shipped on 2023-10-15 at 10:30.", []),
    ("ISBN 978-3-16-148410-0 is on the back.", []),
    ("Upgrade from 1.2.3 to 2.0.0 and 10.1.2.", []),
    ("Order 20231015001 was delivered.", []),
    ("It cost 1,299.00 euros in 1999-2005.", []),
    ("Postcode 75008, Paris.", []),
    # -- credit card
    ("Card 4111 1111 1111 1111 exp 12/29", [("credit_card", "4111 1111 1111 1111")]),
    ("Pay with 5555-5555-5555-4444.", [("credit_card", "5555-5555-5555-4444")]),
    ("Amex 378282246310005 works", [("credit_card", "378282246310005")]),
    ("Visa 4012888888881881!", [("credit_card", "4012888888881881")]),
    ("Not a card: 4111 1111 1111 1112.", []),
    ("Tracking number 1234567890123456", []),
    # -- IPv4
    ("Server at 10.0.0.1 answered.", [("ipv4", "10.0.0.1")]),
    ("Ping 192.168.1.254, then 8.8.8.8.", [("ipv4", "192.168.1.254"), ("ipv4", "8.8.8.8")]),
    ("Version 1.2.3 is not an address, nor 999.1.1.1.", []),
    # -- IBAN
    ("IBAN DE89 3704 0044 0532 0130 00 please", [("iban", "DE89 3704 0044 0532 0130 00")]),
    ("Virement sur FR14 2004 1010 0505 0001 3M02 606", [("iban", "FR14 2004 1010 0505 0001 3M02 606")]),
    ("GB82WEST12345698765432", [("iban", "GB82WEST12345698765432")]),
    ("Not an IBAN: DE00 1234 5678 9012 3456 78", []),
    # -- secrets
    ("OpenAI key sk-proj-abc123def456ghi789jkl0mno", [("secret", "sk-proj-abc123def456ghi789jkl0mno")]),
    ("Anthropic sk-ant-api03-Xy9_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7-dE9fG1hJ3", [("secret", "sk-ant-api03-Xy9_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7-dE9fG1hJ3")]),
    ("AWS AKIAIOSFODNN7EXAMPLE in the env", [("secret", "AKIAIOSFODNN7EXAMPLE")]),
    ("token ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", [("secret", "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8")]),
    ("GitLab glpat-xY12_ab34CD56ef78GH90", [("secret", "glpat-xY12_ab34CD56ef78GH90")]),
    ("Google AIzaSyD4x5Y6z7A8b9C0d1E2f3G4h5I6j7K8l9M", [("secret", "AIzaSyD4x5Y6z7A8b9C0d1E2f3G4h5I6j7K8l9M")]),
    ("Stripe sk_live_51H8aBcDeFgHiJkLmNoPqRsT and rk_live_51H8aBcDeFgHiJkLmN", [("secret", "sk_live_51H8aBcDeFgHiJkLmNoPqRsT"), ("secret", "rk_live_51H8aBcDeFgHiJkLmN")]),
    ("HF hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", [("secret", "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789")]),
    ("Slack xoxb-1234567890-0987654321-AbCdEfGhIjKl", [("secret", "xoxb-1234567890-0987654321-AbCdEfGhIjKl")]),
    ("JWT eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", [("secret", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")]),
    ("Here:\n" + PEM_RSA + "\nkeep it safe", [("secret", PEM_RSA)]),
    ("EC key:\n" + PEM_EC + "\n", [("secret", PEM_EC)]),
    ("PKCS8:\n" + PEM_PKCS8, [("secret", PEM_PKCS8)]),
    ("PGP:\n" + PGP + "\nend", [("secret", PGP)]),
    ("Public only:\n" + CERTIFICATE, []),
    ("Install sk-learn? No: scikit-learn, and task-runner-helper-module-name.", []),
    ("The ghp_ prefix marks GitHub tokens; hf_ marks Hugging Face ones.", []),
]
